"""TensorBoard event files from mdt_jax/training/events.py, read back by TensorBoard's own
loader; the training loop starts without importing TensorFlow."""

import ast
import importlib.util
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mdt_jax.training.events import EventWriter
from mdt_jax.training import logdir
from mdt_jax.training.logdir import ProfileWindow
from tensorboard_events import HPARAMS, read_events, scalar

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
  """clu's metrics and parameter overview are on the training path; its writers (TensorFlow)
  are not."""
  mods = ('tensorflow', 'keras', 'clu.metric_writers', 'clu.metrics', 'clu.parameter_overview')
  code = (
      'import sys, mdt_jax.main, mdt_jax.training.loop; '
      f'print(sorted(m for m in {mods} if m in sys.modules))'
  )
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "['clu.metrics', 'clu.parameter_overview']", out.stdout


def test_texts_histograms_and_hparams_read_back(tmp_path):
  rng = np.random.default_rng(0)
  values = rng.normal(size=1000)
  writer = EventWriter(str(tmp_path))
  writer.write_texts(2, {'config': '    model: S/4'})
  writer.write_histograms(2, {'w': values, 'b': values[:10]}, num_buckets={'b': 3})
  config = {'model': {'hidden_size': 96, 'mlp': 4.0}, 'mask': True, 'rules': [('a', None)]}
  writer.write_hparams(config)
  writer.write_summaries(4, {'raw': np.arange(3, dtype=np.int32)})
  writer.close()
  events = read_events(str(tmp_path))
  assert events['config'][2] == ['    model: S/4']
  [w] = events['w'][2]
  assert w.shape == (30, 3) and w[:, 2].sum() == 1000  # left, right, count; 30 buckets
  assert w[0, 0] == values.min() and w[-1, 1] == values.max()
  assert events['b'][2][0].shape == (3, 3)
  assert events[HPARAMS][0] == [
      {'model.hidden_size': 96, 'model.mlp': 4.0, 'mask': True, 'rules.0.0': 'a', 'rules.0.1': ''}
  ]
  assert (events['raw'][4][0] == np.arange(3)).all()


def _abstract_methods(path: str, cls: str) -> dict[str, list[str]]:
  """Abstract methods of a class in a source file -> their parameter names (read, not
  imported: importing clu.metric_writers imports TensorFlow)."""
  tree = ast.parse(open(path).read())
  [node] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
  out = {}
  for f in node.body:
    if isinstance(f, ast.FunctionDef) and any(
        ast.unparse(d).endswith('abstractmethod') for d in f.decorator_list
    ):
      a = f.args
      out[f.name] = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
  return out


def test_event_writer_has_clus_metric_writer_methods():
  import inspect

  clu_dir = os.path.dirname(importlib.util.find_spec('clu').origin)
  methods = _abstract_methods(
      os.path.join(clu_dir, 'metric_writers', 'interface.py'), 'MetricWriter'
  )
  assert {'write_scalars', 'write_images', 'write_texts', 'write_hparams', 'flush'} <= set(methods)
  for name, params in methods.items():
    own = list(inspect.signature(getattr(EventWriter, name)).parameters)
    assert own == params, (name, own, params)


_CLU = r"""
import os, sys
from mdt_jax import errors, faults
from mdt_jax.training import logdir
plain, faulty, log = sys.argv[1:]
writer, where = logdir.create_writer(plain, kind='clu')
writer.write_scalars(1, {'loss': 0.5})
writer.write_texts(1, {'config': 'x'})
writer.close()
print('writer', type(writer._writer).__module__, 'tensorflow' in sys.modules, flush=True)
# the fault hook on the same writer (its variables are read at each write)
os.environ.update({faults.ENV: 'events@3:enospc,events@4:kill', faults.LOG_ENV: log})
writer, _ = logdir.create_writer(faulty, kind='clu')
print('file', writer.path, flush=True)
writer.write_scalars(1, {'loss': 0.5})  # events@1
writer.flush()  # events@2: the queue reaches the file
try:
  writer.write_scalars(2, {'loss': 0.25})  # events@3: a full disk
except errors.WriteFailed as e:
  print('error', e, flush=True)
writer.write_scalars(3, {'loss': 0.125})  # events@4: killed
"""


def test_clu_writer_is_chosen_by_config_and_its_writes_pass_the_fault_hook(tmp_path):
  """config.metric_writer='clu' gives clu's default writer, TensorFlow imported then; its event
  file reads back too. TensorFlow writes that file, and each write call and flush passes the
  fault hook first (logdir.HookedCluWriter): a full disk is a WriteFailed naming the file, a
  kill keeps what was flushed. One process for both: TensorFlow's import is most of its time."""
  plain, faulty, log = tmp_path / 'plain', tmp_path / 'faulty', tmp_path / 'writes.log'
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-c', _CLU, str(plain), str(faulty), str(log)],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == -9, out.stderr[-2000:]
  assert 'writer clu.metric_writers.multi_writer True' in out.stdout, out.stdout
  events = read_events(str(plain))
  assert scalar(events, 'loss', 1) == 0.5 and events['config'][1] == ['x']
  [path] = re.findall(r'^file (.*)$', out.stdout, re.M)
  assert os.path.dirname(path) == str(faulty) and 'tfevents' in os.path.basename(path)
  assert re.findall(r'^error (.*)$', out.stdout, re.M) == [
      f'writing {path} failed: [Errno 28] No space left on device (injected at events@3)'
  ]
  assert open(log).read().splitlines() == [f'events\t{n}\t{path}' for n in (1, 2, 3, 4)]
  assert dict(read_events(str(faulty))['loss']) == {1: [0.5]}
  with pytest.raises(ValueError, match="'events' or 'clu', got 'tf'"):
    logdir.create_writer(str(tmp_path), kind='tf')
