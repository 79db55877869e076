"""Official checkpoint layout, import, export and the model folder."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_mdt as ref
import mdt_jax
from mdt_jax import MDTConfig, errors, model_config
from mdt_jax.hub import official
from mdt_jax.hub.convert import convert_official
from mdt_jax.hub.folder import load_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=6,
    num_heads=4,
    decode_layer=2,
    num_classes=10,
    mask_ratio=0.3,
)


class Shape:
  """Stands in for a tensor: only .shape is read when inferring and checking layouts."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def _shapes_only(cfg):
  sd = {k: Shape(e.shape) for k, e in official.layout(cfg).items()}
  index = ref.rel_index(cfg.grid)
  sd.update({b: index for b in official.index_buffers(cfg)})
  return sd


def test_full_xl2_layout_has_the_394_official_entries():
  cfg = MDTConfig.from_dict(model_config('XL/2', decode_layer=4).to_dict())
  keys = official.layout(cfg)
  buffers = official.index_buffers(cfg)
  assert len(keys) + len(buffers) == 394 and len(buffers) == 29
  spec = {
      'pos_embed': (1, 256, 1152),
      'decoder_pos_embed': (1, 256, 1152),
      'mask_token': (1, 1, 1152),
      'x_embedder.proj.weight': (1152, 4, 2, 2),
      't_embedder.mlp.0.weight': (1152, 256),
      't_embedder.mlp.2.weight': (1152, 1152),
      'y_embedder.embedding_table.weight': (1001, 1152),
      'final_layer.linear.weight': (32, 1152),
      'final_layer.adaLN_modulation.1.weight': (2304, 1152),
      'en_inblocks.11.attn.qkv.weight': (3456, 1152),
      'en_outblocks.0.skip_linear.weight': (1152, 2304),
      'de_blocks.3.attn.rel_pos_bias.relative_position_bias_table': (964, 16),
      'de_blocks.3.mlp.fc1.weight': (4608, 1152),
      'sideblocks.0.adaLN_modulation.1.bias': (6912,),
  }
  for k, s in spec.items():
    assert keys[k].shape == s, k
  per_block = lambda p: sum(1 for k in keys if k.startswith(p)) + sum(
      1 for b in buffers if b.startswith(p)
  )
  assert per_block('en_inblocks.0.') == 12 and per_block('en_outblocks.0.') == 14
  assert per_block('de_blocks.0.') == 14 and per_block('sideblocks.0.') == 12
  assert not any(k.startswith('en_inblocks.0.skip_linear') for k in keys)
  assert 'de_blocks.0.attn.rel_pos_bias.relative_position_index' in buffers


def test_infer_config_from_xl2_and_v1_layouts():
  v2 = MDTConfig.from_dict(model_config('XL/2', decode_layer=4).to_dict())
  got = official.infer_config(_shapes_only(v2))
  assert got == v2
  v1 = MDTConfig.from_dict(
      model_config('XL/2', decode_layer=2, arch='mdt_v1', mask_ratio_span=0.0).to_dict()
  )
  sd = _shapes_only(v1)
  assert len(sd) == 362  # the released v1 file's entry count
  assert official.infer_config(sd) == v1
  official.check_state(sd, v1)


def test_state_dict_round_trip():
  cfg = MDTConfig.from_dict(model_config('S/2', **TINY).to_dict())
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid)
  model = official.model_from_state(sd, cfg)
  from flax import nnx

  back = official.from_flax_params(nnx.state(model, nnx.Param), cfg)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert back['sideblocks.0.attn.rel_pos_bias.relative_position_index'].dtype == np.int64


def test_mismatched_checkpoint_is_refused_with_keys_named(tmp_path):
  cfg = MDTConfig.from_dict(model_config('S/2', **TINY).to_dict())
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid)
  del sd['de_blocks.1.mlp.fc2.bias']
  sd['de_blocks.7.mlp.fc2.bias'] = np.zeros(32, np.float32)
  sd['en_inblocks.0.attn.proj.weight'] = np.zeros((32, 31), np.float32)
  with pytest.raises(official.CheckpointMismatch) as e:
    official.to_flax_params(sd, cfg)
  msg = str(e.value)
  assert 'missing keys: de_blocks.1.mlp.fc2.bias' in msg
  assert 'unexpected keys: de_blocks.7.mlp.fc2.bias' in msg
  assert 'en_inblocks.0.attn.proj.weight: file (32, 31) vs model (32, 32)' in msg
  # the converter writes nothing for such a file
  ckpt = tmp_path / 'bad.pt'
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, ckpt)
  with pytest.raises(official.CheckpointMismatch):
    convert_official(str(ckpt), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]


def test_convert_tool_and_load_pretrained_match_reference(tmp_path, monkeypatch):
  cfg = MDTConfig.from_dict(model_config('S/2', **TINY).to_dict())
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid, seed=4)
  ckpt = tmp_path / 'mdt_tiny.pt'
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, ckpt)
  out = tmp_path / 'models' / 'tiny'
  # as typed in the folder that holds the checkpoint: relative paths, nothing from pytest's folder
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, 'tools', 'convert_official.py'),
          '--checkpoint=mdt_tiny.pt',
          '--out=models/tiny',
      ],
      cwd=tmp_path,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700
  assert os.stat(out / 'model.safetensors').st_mode & 0o777 == 0o666 & ~umask
  monkeypatch.chdir(tmp_path)
  model = mdt_jax.load_pretrained('models/tiny')
  assert model.config == official.infer_config(sd)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t, y = np.array([10, 900]), np.array([3, 10])
  got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
  want = ref.forward(sd, x.transpose(0, 3, 1, 2), t, y, heads=4, decode_layer=2)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-5, rtol=1e-4)
  ids = np.stack([rng.permutation(16) for _ in range(2)]).astype(np.int32)
  got = model(
      jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), ids_shuffle=jnp.asarray(ids), len_keep=9
  )
  want = ref.forward(
      sd, x.transpose(0, 3, 1, 2), t, y, heads=4, decode_layer=2, ids_shuffle=ids, len_keep=9
  )
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-5, rtol=1e-4)


def test_model_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a model folder'):
    mdt_jax.load_pretrained(str(tmp_path))
  cfg = MDTConfig.from_dict(model_config('S/2', **TINY).to_dict())
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid)
  from mdt_jax.hub.folder import save_model_folder

  folder = tmp_path / 'm'
  save_model_folder(str(folder), official.to_flax_params(sd, cfg), cfg)
  with pytest.raises(FileExistsError):
    save_model_folder(str(folder), official.to_flax_params(sd, cfg), cfg)
  (folder / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    load_model_folder(str(folder))
  os.remove(folder / 'model.safetensors')
  with pytest.raises(errors.BadFile, match='has no weights'):
    load_model_folder(str(folder))
