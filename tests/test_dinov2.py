"""DINOv2 in Flax NNX against transformers' PyTorch models, its import and its folder."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.numpy import load_file, save_file

from mdt_jax.hub import dinov2 as hub
from mdt_jax.models import dinov2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=42, patch_size=7
)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _hf_folder(path, registers=0, seed=0, **fields):
  """A transformers DINOv2 with every tensor random (norms, biases and layer scales too), saved
  with save_pretrained; returns (folder, the torch model)."""
  torch.manual_seed(seed)
  if registers:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **fields)
    model = transformers.Dinov2WithRegistersModel(config)
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**fields))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(str(path))
  return str(path), model


def _torch_tokens(model, pixels):
  with torch.no_grad():
    nchw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    return model(pixel_values=nchw).last_hidden_state.numpy()


def _pixels(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('sizes', [(37, 16), (6, 3), (4, 7), (16, 16)])
def test_resize_matrix_equals_torch_bicubic(sizes, antialias):
  n_in, n_out = sizes
  x = torch.randn(1, 1, n_in, n_in + 1, dtype=torch.float64)
  want = F.interpolate(
      x, size=(n_out, n_out + 2), mode='bicubic', align_corners=False, antialias=antialias
  )
  rows = dinov2.resize_matrix(n_in, n_out, antialias)
  cols = dinov2.resize_matrix(n_in + 1, n_out + 2, antialias)
  np.testing.assert_allclose(rows @ x[0, 0].numpy() @ cols.T, want[0, 0].numpy(), atol=1e-12)


@pytest.mark.parametrize(
    'registers, fields',
    [(0, {}), (3, {}), (0, dict(use_swiglu_ffn=True, layerscale_value=0.1))],
    ids=['plain', 'registers', 'swiglu'],
)
def test_small_dinov2_equals_transformers(tmp_path, registers, fields):
  hf_dir, torch_model = _hf_folder(tmp_path / 'hf', registers, **SMALL, **fields)
  folder = hub.convert(hf_dir, str(tmp_path / 'ours'))
  model = dinov2.load(folder)
  assert model.config.num_register_tokens == registers
  # the table's own 6x6 grid, and 4x8 and 9x9 grids (positions interpolated)
  for shape in [(2, 42, 42, 3), (1, 28, 56, 3), (1, 63, 63, 3)]:
    x = _pixels(shape)
    want = _torch_tokens(torch_model, x)
    got = np.asarray(model(jnp.asarray(x)))
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-5, shape
  tokens = model.patch_tokens(jnp.asarray(x))
  np.testing.assert_array_equal(tokens, got[:, 1 + registers :])


def test_vit_b14_equals_transformers_at_224(tmp_path):
  """The released ViT-B/14 architecture (its table at 518 px, 37 x 37) on one 224 px image."""
  fields = {
      k: getattr(dinov2.preset('B/14'), k)
      for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'image_size')
  }
  hf_dir, torch_model = _hf_folder(tmp_path / 'hf', **fields)
  model = dinov2.load(hub.convert(hf_dir, str(tmp_path / 'ours')))
  assert model.config == dinov2.preset('B/14')
  x = _pixels((1, 224, 224, 3))
  want = _torch_tokens(torch_model, x)
  got = np.asarray(model(jnp.asarray(x)))
  assert got.shape == want.shape == (1, 1 + 16 * 16, 768)
  assert _rel(got, want) <= 1e-5


def test_normalize_resizes_as_repa():
  """[-1, 1] images -> ImageNet-normalised, then bicubic to 224 as PyTorch resizes them."""
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, 256, 256, 3)).astype(np.float32)
  got = np.asarray(dinov2.normalize(jnp.asarray(images)))
  x = ((images + 1) / 2 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
  x = torch.from_numpy(x.transpose(0, 3, 1, 2))  # float64: PyTorch's float32 weights round
  want = F.interpolate(x, size=(224, 224), mode='bicubic', align_corners=False)
  assert got.shape == (2, 224, 224, 3)
  assert _rel(got, want.numpy().transpose(0, 2, 3, 1)) <= 1e-6
  with pytest.raises(ValueError, match='RGB images NHWC'):
    dinov2.normalize(jnp.zeros((1, 16, 16, 1)))


def test_pool_tokens_is_area_interpolation_and_refuses_grids_that_cannot_match():
  tokens = np.random.default_rng(0).normal(size=(2, 16 * 16, 5)).astype(np.float32)
  grid = torch.from_numpy(tokens.reshape(2, 16, 16, 5).transpose(0, 3, 1, 2))
  for g in (16, 8, 4):
    want = F.interpolate(grid, size=(g, g), mode='area').numpy().transpose(0, 2, 3, 1)
    got = np.asarray(dinov2.pool_tokens(jnp.asarray(tokens), g))
    np.testing.assert_allclose(got, want.reshape(2, g * g, 5), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"teacher's 16x16 patch grid cannot match the student's 32"):
    dinov2.pool_tokens(jnp.asarray(tokens), 32)
  with pytest.raises(ValueError, match='16x16 patch grid cannot match .* 6x6'):
    dinov2.pool_tokens(jnp.asarray(tokens), 6)
  with pytest.raises(ValueError, match='not a square grid'):
    dinov2.pool_tokens(jnp.asarray(tokens[:, :200]), 4)


def test_convert_tool_and_bad_folders(tmp_path):
  hf_dir, torch_model = _hf_folder(tmp_path / 'hf', **SMALL)
  out = tmp_path / 'ours'
  tool = os.path.join(ROOT, 'tools', 'convert_dinov2.py')
  run = lambda *a: subprocess.run(  # noqa: E731
      [sys.executable, tool, *a], capture_output=True, text=True, cwd=ROOT
  )
  done = run(f'--hf_dir={hf_dir}', f'--out={out}')
  assert done.returncode == 0, done.stderr
  x = _pixels((1, 42, 42, 3))
  assert _rel(dinov2.load(str(out))(jnp.asarray(x)), _torch_tokens(torch_model, x)) <= 1e-5
  assert json.loads((out / 'config.json').read_text())['format'] == dinov2.FORMAT

  # the transformers folder itself is not ours
  with pytest.raises(ValueError, match='must first go through tools/convert_dinov2.py'):
    dinov2.load(hf_dir)
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    dinov2.load(str(tmp_path))
  # a missing weights file, named with what is there
  os.rename(os.path.join(hf_dir, 'model.safetensors'), os.path.join(hf_dir, 'w.bin'))
  with pytest.raises(
      FileNotFoundError, match=r"no model.safetensors .* \['config.json', 'w.bin'\]"
  ):
    hub.read_hf(hf_dir)
  # a missing and a mis-shaped key, named
  state = load_file(os.path.join(hf_dir, 'w.bin'))
  del state['encoder.layer.1.mlp.fc2.bias']
  state['layernorm.weight'] = np.ones(31, np.float32)
  save_file(state, os.path.join(hf_dir, 'model.safetensors'))
  with pytest.raises(
      ValueError,
      match=r'(?s)1 missing keys: encoder.layer.1.mlp.fc2.bias.*'
      r'layernorm.weight: file \(31,\) vs model \(32,\)',
  ):
    hub.read_hf(hf_dir)
  # another architecture, refused by the tool before anything is written
  cfg = json.loads(open(os.path.join(hf_dir, 'config.json')).read())
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump({**cfg, 'model_type': 'vit', 'architectures': ['ViTModel']}, f)
  bad = run(f'--hf_dir={hf_dir}', f'--out={tmp_path / "never"}')
  assert bad.returncode != 0 and "model_type 'vit'" in bad.stderr
  assert not (tmp_path / 'never').exists()
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump({**cfg, 'architectures': ['Dinov2ForImageClassification']}, f)
  with pytest.raises(ValueError, match='only the bare Dinov2Model is read'):
    hub.read_hf(hf_dir)
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    hub.read_hf(str(tmp_path / 'nowhere'))
