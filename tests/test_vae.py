"""mdt_jax.vae against diffusers' PyTorch AutoencoderKL (random weights, CPU, float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mdt_jax.vae as vae_lib
from mdt_jax.vae.convert import DIFFUSERS_WEIGHTS, diffusers_name

SMALL = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
)
SD = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    latent_channels=4,
    sample_size=256,
)
# The SD VAE's structure (4 levels, 2 layers per block, 32 groups, mid-block attention) at a
# width whose random PyTorch reference runs in a second; the full width is checked from shapes.
SD_NARROW = dict(SD, block_out_channels=(32, 32, 64, 64))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_autoencoder_kl() -> type:
  """diffusers' AutoencoderKL, imported when a test needs it: importing diffusers takes about 5 s,
  which every pytest-xdist worker would pay at collection, also those that run none of these."""
  from diffusers import AutoencoderKL

  return AutoencoderKL


def torch_vae(cfg: dict, seed: int):
  """diffusers AutoencoderKL with every parameter drawn afresh (norms and biases included)."""
  n = len(cfg['block_out_channels'])
  torch.manual_seed(seed)
  model = torch_autoencoder_kl()(
      down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n, **cfg
  ).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        is_norm_scale = 'norm' in name and name.endswith('weight')
        p.copy_(1 + 0.3 * noise if is_norm_scale else 0.3 * noise)
      else:
        fan_in = p[0].numel()
        p.copy_(noise * (1.3 / fan_in**0.5))
  return model


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def assert_close(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  scale = float(np.abs(ref).max())
  assert scale > 1e-2, 'reference output is degenerate; the check would prove nothing'
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5 * scale)


def check_parity(tmp_path, cfg: dict, size: int, seed: int, with_tool: bool = False):
  model = torch_vae(cfg, seed)
  model.save_pretrained(tmp_path / 'diffusers', safe_serialization=True)
  if with_tool:  # the converter as users run it
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'tools', 'convert_vae.py'),
            f'--diffusers_dir={tmp_path / "diffusers"}',
            f'--out={tmp_path / "ours"}',
        ],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'wrote {tmp_path / "ours"}' in proc.stdout
    vae = vae_lib.load(str(tmp_path / 'ours'))
  else:
    vae = vae_lib.load(vae_lib.convert(str(tmp_path / 'diffusers'), str(tmp_path / 'ours')))
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
  f = 2 ** (len(cfg['block_out_channels']) - 1)
  latents = rng.normal(size=(2, cfg['latent_channels'], size // f, size // f)).astype(np.float32)
  with torch.no_grad():
    post = model.encode(torch.from_numpy(images)).latent_dist
    decoded = model.decode(torch.from_numpy(latents)).sample
  mean, logvar = vae.encode(nhwc(images))
  assert_close(mean, nhwc(post.mean))
  assert_close(logvar, nhwc(post.logvar))
  assert_close(vae.decode(nhwc(latents)), nhwc(decoded))
  return vae


def test_parity_small_config_through_the_convert_tool(tmp_path):
  vae = check_parity(tmp_path, SMALL, 16, seed=0, with_tool=True)
  assert vae.config.block_out_channels == (32, 64)
  assert vae.scaling_factor == pytest.approx(0.18215)


def test_parity_sd_vae_structure(tmp_path):
  vae = check_parity(tmp_path, SD_NARROW, 32, seed=1)
  assert vae.config.downsample_factor == 8 and vae.config.layers_per_block == 2


def test_sd_vae_layout_and_parameter_count_from_shapes():
  """The full-width SD VAE without weights: every diffusers key has its parameter here, in the
  layout the converter gives (OIHW -> HWIO, linear transposed), and both count the published
  sd-vae-ft-mse parameters."""
  n = len(SD['block_out_channels'])
  autoencoder_kl = torch_autoencoder_kl()
  with torch.device('meta'):
    model = autoencoder_kl(
        down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n, **SD
    )
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  _, ours = vae_lib.io.param_shapes(vae_lib.VAEConfig.from_dict(SD))
  ours = {diffusers_name(k): tuple(v.shape) for k, v in ours.items()}
  assert sorted(ours) == sorted(theirs)
  for k, shape in theirs.items():
    want = (
        {4: lambda o, i, h, w: (h, w, i, o), 2: lambda o, i: (i, o)}.get(len(shape), lambda *a: a)(
            *shape
        )
        if k.endswith('weight') and len(shape) > 1
        else shape
    )
    assert ours[k] == want, (k, shape, ours[k])
  assert sum(int(np.prod(s)) for s in theirs.values()) == 83_653_863
  assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863


def test_old_attention_names_and_bfloat16(tmp_path):
  model = torch_vae(SMALL, 2)
  model.save_pretrained(tmp_path / 'new', safe_serialization=True)
  tensors = load_file(str(tmp_path / 'new' / DIFFUSERS_WEIGHTS))
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  old = {}
  for k, v in tensors.items():
    for new, was in renames.items():
      k = k.replace(f'attentions.0.{new}.', f'attentions.0.{was}.')
    old[k] = v
  assert any('.query.' in k for k in old) and any('.proj_attn.' in k for k in old)
  os.makedirs(tmp_path / 'old')
  save_file(old, str(tmp_path / 'old' / DIFFUSERS_WEIGHTS))
  (tmp_path / 'old' / 'config.json').write_text((tmp_path / 'new' / 'config.json').read_text())

  _, from_new = vae_lib.read_diffusers(str(tmp_path / 'new'))
  _, from_old = vae_lib.read_diffusers(str(tmp_path / 'old'))
  assert sorted(from_new) == sorted(from_old)
  for k in from_new:
    np.testing.assert_array_equal(from_new[k], from_old[k])

  out = vae_lib.convert(str(tmp_path / 'old'), str(tmp_path / 'ours'))
  f32, bf16 = vae_lib.load(out), vae_lib.load(out, dtype=jnp.bfloat16)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  m32, m16 = f32.encode(x)[0], bf16.encode(x)[0]
  assert m16.dtype == jnp.float32
  err = float(jnp.abs(m32 - m16).max() / jnp.abs(m32).max())
  assert 0 < err < 0.1, err  # bfloat16 compute really happened, and stayed close


def test_mismatched_folder_is_refused(tmp_path):
  torch_vae(SMALL, 3).save_pretrained(tmp_path / 'd', safe_serialization=True)
  path = str(tmp_path / 'd' / DIFFUSERS_WEIGHTS)
  tensors = load_file(path)
  del tensors['decoder.conv_out.bias']
  tensors['encoder.extra.weight'] = np.zeros((3,), np.float32)
  tensors['quant_conv.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  save_file(tensors, path)
  out = tmp_path / 'out'
  with pytest.raises(ValueError) as e:
    vae_lib.convert(str(tmp_path / 'd'), str(out))
  msg = str(e.value)
  assert 'decoder.conv_out.bias' in msg and 'encoder.extra.weight' in msg
  assert 'quant_conv.weight' in msg
  assert not out.exists() and os.listdir(tmp_path) == ['d']  # nothing half-written


def test_config_mismatch_and_missing_files_are_refused(tmp_path):
  torch_vae(SMALL, 4).save_pretrained(tmp_path / 'd', safe_serialization=True)
  cfg_path = tmp_path / 'd' / 'config.json'
  cfg = json.loads(cfg_path.read_text())
  cfg['block_out_channels'] = [32, 128]
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match='mismatched shapes .*decoder.conv_in.weight'):
    vae_lib.read_diffusers(str(tmp_path / 'd'))
  with pytest.raises(ValueError, match="unknown AutoencoderKL config keys \\['flavour'\\]"):
    vae_lib.VAEConfig.from_dict({**cfg, 'flavour': 1})
  with pytest.raises(ValueError, match='down_block_types'):
    vae_lib.VAEConfig.from_dict({**cfg, 'down_block_types': ['AttnDownEncoderBlock2D'] * 2})
  os.remove(tmp_path / 'd' / DIFFUSERS_WEIGHTS)
  with pytest.raises(FileNotFoundError, match=DIFFUSERS_WEIGHTS):
    vae_lib.read_diffusers(str(tmp_path / 'd'))


def test_save_load_round_trip(tmp_path):
  config = vae_lib.VAEConfig.from_dict(SMALL)
  model = vae_lib.io.from_params(config, vae_lib.io.random_params(config, seed=5))
  vae_lib.save(model, str(tmp_path / 'v'))
  with pytest.raises(FileExistsError):
    vae_lib.save(model, str(tmp_path / 'v'))
  loaded = vae_lib.load(str(tmp_path / 'v'))
  z = np.random.default_rng(1).normal(size=(1, 4, 4, 4)).astype(np.float32)
  np.testing.assert_allclose(loaded.decode(z), vae_lib.VAE(model).decode(z), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='latents must be NHWC'):
    loaded.decode(z[..., :3])
