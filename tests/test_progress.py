"""Progress: a bar at a terminal, one line per N% in a log, skipped work outside the rate."""

import io
import logging
import os
import re

import numpy as np
import pytest

from mdt_jax import progress as progress_lib
from mdt_jax.progress import Progress


class Clock:
  """A time.monotonic that moves only when told."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  c = Clock()
  monkeypatch.setattr(progress_lib.time, 'monotonic', c)
  return c


def test_log_writes_one_line_per_ten_percent(clock):
  out = io.StringIO()  # not a terminal
  with Progress(200, 'sampling', stream=out) as p:
    assert not p.interactive
    for _ in range(200):
      clock.now += 0.5
      p.update(1)
  text = out.getvalue()
  assert '\r' not in text
  lines = text.splitlines()
  assert [re.search(r'\((\d+)%\)', ln).group(1) for ln in lines] == [
      str(10 * k) for k in range(1, 11)
  ]
  # 2 images/s throughout: at 10%, 180 images are left, 90 s
  assert lines[0] == 'sampling: 20/200 images (10%), 2 images/s, 01:30 left'
  assert lines[-1] == 'sampling: 200/200 images (100%), 2 images/s, done'


def test_large_updates_write_one_line_each_and_close_writes_the_last(clock):
  out = io.StringIO()
  p = Progress(1000, 'latents', every_percent=25, stream=out)
  clock.now += 10
  p.update(600)  # passes 25% and 50%: one line
  clock.now += 10
  p.update(100)  # 70%: no line
  p.close()  # ends short of the total: the last line says where it stopped
  lines = out.getvalue().splitlines()
  assert lines == [
      'latents: 600/1000 images (60%), 60 images/s, 00:06 left',
      'latents: 700/1000 images (70%), 35 images/s, 00:08 left',
  ]


def test_skipped_work_moves_the_count_not_the_rate(clock):
  out = io.StringIO()
  p = Progress(100, 'sampling', stream=out)
  p.skip(50)  # a resumed run's finished shards
  clock.now += 10
  p.update(10)
  assert p.done == 60 and p.worked == 10
  assert p.rate() == pytest.approx(1.0)  # 10 sampled in 10 s, not 60
  assert out.getvalue().splitlines()[-1] == 'sampling: 60/100 images (60%), 1 images/s, 00:40 left'


def test_at_a_terminal_a_bar_with_rate_and_time_left(clock):
  out = io.StringIO()
  with Progress(40, 'converting', unit='tensors', stream=out, interactive=True) as p:
    p.skip(10)
    for _ in range(30):
      p.update(1)
  text = out.getvalue()
  assert '\r' in text  # redrawn in place
  assert 'converting' in text and '40/40' in text and 'tensors/s' in text


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match='total must be >= 0, got -1'):
    Progress(-1, 'x')
  with pytest.raises(ValueError, match=r'every_percent must be in \(0, 100\], got 0'):
    Progress(10, 'x', every_percent=0)


def test_disabled_writes_nothing(clock):
  out = io.StringIO()
  with Progress(10, 'sampling', stream=out, enabled=False) as p:
    p.skip(5)
    p.update(5)
  assert out.getvalue() == ''


class FakeSampler:
  """A Sampler's interface: 1 s of the fake clock per batch, grey images."""

  num_classes, num_devices = 10, 1

  def __init__(self, clock):
    self.clock, self.batches = clock, 0
    self.config = type('Config', (), {'record': staticmethod(lambda: {'fake': True})})()

  def __call__(self, indices, labels, seed=0):
    self.clock.now += 1.0
    self.batches += 1
    return np.zeros((len(indices), 4, 4, 3), np.float32)


def test_a_sampling_run_moves_the_bar_per_batch_not_per_shard(clock, tmp_path, capsys, caplog):
  from mdt_jax.sampling.run import run_sampling

  caplog.set_level(logging.INFO)
  sampler = FakeSampler(clock)
  kwargs = dict(num_samples=20, batch_size=2, shard_size=10, grid_size=0, labels='balanced')
  run_sampling(sampler, out_dir=str(tmp_path), **kwargs)
  assert sampler.batches == 10
  lines = capsys.readouterr().err.splitlines()
  # a batch is 10%: a line each (two shards gave two lines when the bar moved per shard)
  assert [re.search(r'\((\d+)%\)', ln).group(1) for ln in lines] == [
      str(10 * k) for k in range(1, 11)
  ]
  assert lines[0] == 'sampling: 2/20 images (10%), 2 images/s, 00:09 left'
  assert lines[-1] == 'sampling: 20/20 images (100%), 2 images/s, done'
  assert not [r for r in caplog.records if r.getMessage().startswith('sampled ')]  # no duplicate

  # resumed with one shard missing: the finished shard is skipped, the rate counts the rest
  os.remove(tmp_path / 'shards' / 'shard_00001.npz')
  run_sampling(sampler, out_dir=str(tmp_path), **kwargs)
  lines = capsys.readouterr().err.splitlines()
  assert lines[0] == 'sampling: 10/20 images (50%), 0 images/s, time left unknown'
  assert lines[1] == 'sampling: 12/20 images (60%), 2 images/s, 00:04 left'
  assert lines[-1] == 'sampling: 20/20 images (100%), 2 images/s, done'
