"""The Colab notebook runs top to bottom (CPU, a tiny model folder) and is kept without outputs."""

import base64
import io
import os

import nbformat
import numpy as np
from nbclient import NotebookClient

import reference_mdt as ref
from conftest import TEST_XLA_FLAGS
from mdt_jax import MDTConfig, model_config
from mdt_jax.hub import official
from mdt_jax.hub.folder import save_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'mdt_jax_colab.ipynb')


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_committed_without_outputs():
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert 'parameters' in code[0].metadata.get('tags', [])
  assert nb.metadata.get('accelerator') == 'TPU'


def _tiny_pixel_model(path):
  cfg = MDTConfig.from_dict(
      model_config(
          'S/2',
          input_size=8,
          in_channels=1,
          hidden_size=32,
          depth=4,
          num_heads=2,
          decode_layer=2,
          num_classes=10,
      ).to_dict()
  )
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid, seed=1)
  save_model_folder(
      str(path),
      official.to_flax_params(sd, cfg),
      cfg,
      data=dict(space='pixel', image_size=8, image_channels=1, vae=None),
      sampling=dict(sampler='ddpm', steps=250, cfg_scale=3.0, scale_pow=4.0, guidance_channels=3),
  )


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  model = tmp_path / 'tiny_model'
  _tiny_pixel_model(model)
  params = dict(
      MDT_JAX_MODEL=str(model),
      MDT_JAX_SAMPLER='ddim',
      MDT_JAX_STEPS='8',
      MDT_JAX_CFG_SCALE='2.5',
      MDT_JAX_CLASSES='1,3,7',
      MDT_JAX_PER_CLASS='4',
      MDT_JAX_GRID_PNG=str(tmp_path / 'grid.png'),
  )
  for k, v in params.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv('PYTHONPATH', ROOT)  # the kernel imports this checkout's mdt_jax
  # the kernel compiles at the suite's cheap optimisation level too (conftest.py)
  monkeypatch.setenv('XLA_FLAGS', TEST_XLA_FLAGS + ' --xla_force_host_platform_device_count=2')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = _read()
  NotebookClient(
      nb, timeout=120, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
  ).execute()
  text = '\n'.join(
      o.get('text', '')
      for c in nb.cells
      if c.cell_type == 'code'
      for o in c.outputs
      if o.output_type == 'stream'
  )
  assert 'backend cpu, 2 device(s):\n  cpu:0\n  cpu:1' in text
  assert 'images (12, 8, 8, 3) uint8' in text
  assert 'cfg_scale=2.5' in text and "sampler='ddim'" in text
  pngs = [
      o['data']['image/png']
      for c in nb.cells
      if c.cell_type == 'code'
      for o in c.outputs
      if o.output_type == 'display_data' and 'image/png' in o['data']
  ]
  assert len(pngs) == 1
  from PIL import Image

  shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[0]))))
  zoom = 256 // 8
  assert shown.shape == ((3 * 10 - 2) * zoom, (4 * 10 - 2) * zoom, 3)  # 3 classes x 4 samples
  saved = np.asarray(Image.open(tmp_path / 'grid.png'))
  np.testing.assert_array_equal(saved, shown)
  tile = shown[: 8 * zoom : zoom, : 8 * zoom : zoom]
  assert tile.std() > 0  # a sample, not a blank tile
