"""Training with representation alignment (config.align): SRA and REPA on the micro digits run,
the event file, exact resume, and the refusals before any work."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import mdt_jax
from micro_config import get_config
from tensorboard_events import read_events, scalar
from mdt_jax.models import dinov2
from mdt_jax.models.params import param_name
from mdt_jax.training.run import validate
from mdt_jax.training.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(total=6, **align):
  c = get_config()
  c.total_steps = total
  c.align.update(projector_dim=64, **align)
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _teacher(path) -> str:
  """A random DINOv2 folder seeing the micro run's 8 px digits as a 4 x 4 grid of 2 px patches."""
  config = dinov2.Dinov2Config(
      hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=2
  )
  model = dinov2.Dinov2(config, rngs=nnx.Rngs(0))
  params = {param_name(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
  return dinov2.save(str(path), config, params)


def test_sra_on_both_branches_logs_its_loss_and_resumes_exactly(tmp_path):
  full = train_and_evaluate(_config(method='sra', branches='both'), str(tmp_path / 'full'))
  events = read_events(str(tmp_path / 'full'))
  for step in (3, 6):
    align_loss = scalar(events, 'align/loss', step)
    assert -2.0 <= align_loss <= 2.0  # two branches' negative cosines
    assert scalar(events, 'align/cos', step) == pytest.approx(
        -(scalar(events, 'plain/align_loss', step) + scalar(events, 'masked/align_loss', step)) / 2,
        rel=1e-5,
    )
    total = scalar(events, 'plain/loss', step) + scalar(events, 'masked/loss', step)
    assert scalar(events, 'loss', step) == pytest.approx(total + 0.5 * align_loss, rel=1e-5)
  # stopped at 3 and resumed to 6: the uninterrupted run's state, bit for bit
  train_and_evaluate(_config(3, method='sra', branches='both'), str(tmp_path / 'split'))
  resumed = train_and_evaluate(_config(method='sra', branches='both'), str(tmp_path / 'split'))
  for name in ('params', 'ema_params', 'opt_state'):
    for a, b in zip(
        _leaves(getattr(full['state'], name)), _leaves(getattr(resumed['state'], name))
    ):
      np.testing.assert_array_equal(a, b)
  # the workdir loads as a model without the training-time projector
  model = mdt_jax.load_pretrained(str(tmp_path / 'full'))
  assert model.projector is None and model.config.align_dim == 0
  assert 'projector' in full['state'].params


def test_repa_trains_from_a_teacher_folder(tmp_path):
  teacher = _teacher(tmp_path / 'teacher')
  out = train_and_evaluate(
      _config(3, method='repa', teacher=teacher, resolution=8, weight=1.0), str(tmp_path / 'w')
  )
  events = read_events(str(tmp_path / 'w'))
  assert -1.0 <= scalar(events, 'align/loss', 3) <= 1.0
  assert scalar(events, 'align/cos', 3) == pytest.approx(-scalar(events, 'align/loss', 3))
  assert 'masked/align_loss' not in events  # branches='plain', the default
  assert out['state'].params['projector']['fc3']['kernel'].shape == (64, 16)


def test_alignment_is_refused_before_training(tmp_path):
  with pytest.raises(FileNotFoundError, match="align.teacher='.*missing' does not exist"):
    validate(_config(method='repa', teacher=str(tmp_path / 'missing')))
  with pytest.raises(ValueError, match='needs align.teacher'):
    validate(_config(method='repa'))
  with pytest.raises(ValueError, match=r'align.depth=3 exceeds the encoder depth 2'):
    validate(_config(method='sra', depth=3))
  with pytest.raises(ValueError, match="align.method must be one of .* got 'dino'"):
    validate(_config(method='dino'))
  latents = _config(method='repa', teacher=_teacher(tmp_path / 't'))
  latents.data.name = 'latents'
  with pytest.raises(ValueError, match='needs the teacher features stored beside them'):
    validate(latents)
  # off: the model has no projector
  assert validate(_config()).model.align_dim == 0
  assert validate(_config(method='sra')).model.align_dim == 32


def test_digits_teacher_tool_writes_a_dinov2_folder(tmp_path):
  """The stand-in teacher, one epoch: a DINOv2 folder whose patch grid is the quickstart's."""
  tool = os.path.join(ROOT, 'tools', 'digits_teacher.py')
  out = tmp_path / 'teacher'
  done = subprocess.run(
      [sys.executable, tool, f'--out={out}', '--epochs=1'], capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'test accuracy' in done.stdout
  teacher = dinov2.load(str(out))
  assert teacher.config.grid == 4 and teacher.config.num_channels == 3
  meta = json.loads((out / 'config.json').read_text())
  assert meta['source'].startswith('digits stand-in teacher')
