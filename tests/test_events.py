"""TensorBoard event files from mdt_jax/training/events.py, read back by TensorBoard's own
loader; the training loop starts without importing TensorFlow."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mdt_jax.training.events import EventWriter
from mdt_jax.training.logdir import ProfileWindow
from tensorboard_events import read_events, scalar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scalars_and_images_read_back_as_tensorboard_reads_them(tmp_path):
  from tensorboard.backend.event_processing import event_file_loader

  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (1, 4, 4, 1), dtype=np.uint8)
  writer = EventWriter(str(tmp_path))
  writer.write_scalars(3, {'loss': np.float32(0.25), 'lr': 1e-3})
  writer.write_scalars(6, {'loss': 0.125})
  writer.write_images(6, {'samples': grid, 'gray': gray})
  writer.close()
  events = read_events(str(tmp_path))
  assert scalar(events, 'loss', 3) == 0.25 and scalar(events, 'loss', 6) == 0.125
  assert scalar(events, 'lr', 3) == pytest.approx(1e-3, rel=1e-7)  # stored as float32
  [samples] = events['samples'][6]
  assert [int(v) for v in samples[:2]] == [7, 5]  # width, height, then one PNG per image
  decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in samples[2:]]
  assert len(decoded) == 2 and all((d == g).all() for d, g in zip(decoded, grid))
  [gray_event] = events['gray'][6]
  assert (np.asarray(Image.open(io.BytesIO(gray_event[2]))) == gray[0, ..., 0]).all()
  [path] = os.listdir(tmp_path)
  loaded = list(event_file_loader.EventFileLoader(str(tmp_path / path)).Load())
  assert loaded[0].file_version == 'brain.Event:2'
  plugins = {v.tag: v.metadata.plugin_data.plugin_name for e in loaded for v in e.summary.value}
  assert plugins == {'loss': 'scalars', 'lr': 'scalars', 'samples': 'images', 'gray': 'images'}


def test_logging_only_writer_writes_no_file_and_bad_images_are_refused(tmp_path):
  writer = EventWriter(str(tmp_path / 'none'), just_logging=True)
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_images(1, {'samples': np.zeros((1, 2, 2, 3), np.uint8)})
  writer.close()
  assert not (tmp_path / 'none').exists()
  with pytest.raises(ValueError, match=r"'samples'.*uint8 \[N, H, W, C\].*float32 \(2, 2, 3\)"):
    EventWriter(str(tmp_path)).write_images(1, {'samples': np.zeros((2, 2, 3), np.float32)})


def test_profile_window_traces_the_steps_after_its_start(tmp_path, monkeypatch):
  import jax

  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace', lambda d: calls.append(('start', d)))
  monkeypatch.setattr(jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  window = ProfileWindow(str(tmp_path), after=5, steps=2)
  for step in range(3, 10):
    window(step)
    calls.append(step)
  assert calls == [3, 4, ('start', str(tmp_path)), 5, 6, ('stop',), 7, 8, 9]
  calls.clear()
  cut = ProfileWindow(str(tmp_path), after=1, steps=10)  # the run ends inside the window
  cut(1)
  cut.close()
  cut.close()
  assert calls == [('start', str(tmp_path)), ('stop',)]
  calls.clear()
  off = ProfileWindow(str(tmp_path), after=1, steps=0)
  for step in range(3):
    off(step)
  off.close()
  assert calls == []


def test_training_starts_without_importing_tensorflow():
  code = (
      'import sys, mdt_jax.main, mdt_jax.training.loop; '
      "print(sorted(m for m in ('tensorflow', 'clu', 'keras') if m in sys.modules))"
  )
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]', out.stdout
