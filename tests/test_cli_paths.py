"""The VAE, latent and training command lines from a fresh current folder, every path relative.

One process runs the commands one after another, as a user types them in one shell (the imports
and compiled programs are shared; each command's flags are dropped after it): convert a diffusers
VAE, extract latents from an image folder, extract again after losing a shard (the resume), train
on the latents with relative data and VAE paths, and resume the training. The other entry points
take relative paths in their own tests: mdt_jax.main (test_readme), mdt_jax.sample
(test_sampling), mdt_jax.evaluate and tools/convert_inception.py (test_inception),
tools/export_hub.py (test_export), tools/convert_official.py (test_official).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from test_extract import TINY, make_folder
from test_vae import torch_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs [argv, ...] in this process: ['tools/x.py', ...] as `python tools/x.py ...`,
# ['-m', 'pkg.mod', ...] as `python -m pkg.mod ...`, ['rm', path] removes a file.
RUNNER = r"""
import importlib.util, json, os, runpy, sys
from absl import flags
for argv in json.loads(sys.argv[1]):
  if argv[0] == 'rm':
    os.remove(argv[1])
    continue
  print('$ python ' + ' '.join(argv), file=sys.stderr, flush=True)
  module = argv[1] if argv[0] == '-m' else None
  sys.argv = [module or argv[0]] + argv[2 if module else 1:]
  try:
    if module:
      runpy.run_module(module, run_name='__main__', alter_sys=True)
    else:
      runpy.run_path(argv[0], run_name='__main__')
  except SystemExit as e:       # absl's app.run exits when main returns
    if e.code not in (0, None):
      raise
  # the command's own flags (absl files them under the script's path, sys.argv[0] as it ran);
  # the libraries' stay defined, as in any long-lived process
  script = importlib.util.find_spec(module).origin if module else argv[0]
  own = flags.FLAGS.flags_by_module_dict().get(script, [])
  for name in {f.name for f in own} | {n for n in flags.FLAGS if n.startswith('config.')}:
    delattr(flags.FLAGS, name)
"""

# As tests/test_latent_training.py trains (8x8x4 latents of 16x16 images, 2 classes, batch 8):
# the compiled programs are shared through the session's compilation cache.
TRAIN = [
    '-m',
    'mdt_jax.main',
    f'--config={ROOT}/tests/micro_config.py',
    '--workdir=runs/lat',
    '--config.data.name=latents',
    '--config.data.path=latents',
    '--config.data.flip=True',
    '--config.data.image_size=16',
    '--config.data.vae=vae',
    '--config.model.input_size=8',
    '--config.model.in_channels=4',
    '--config.model.num_classes=2',
    '--config.global_batch_size=8',
]
EXTRACT = [
    f'{ROOT}/tools/extract_latents.py',
    '--source=folder',
    '--image_dir=images',
    '--vae=vae',
    '--out=latents',
    '--image_size=16',
    '--batch_size=8',
    '--images_per_shard=8',
    '--num_workers=2',
]


@pytest.mark.slow
def test_vae_latent_and_training_commands_take_relative_paths(tmp_path):
  torch_vae(TINY, seed=0).save_pretrained(tmp_path / 'diffusers', safe_serialization=True)
  make_folder(tmp_path / 'images')  # 21 readable images of 2 classes, 1 corrupt
  shard = 'latents/latents-00001-of-00003.array_record'
  commands = [
      [f'{ROOT}/tools/convert_vae.py', '--diffusers_dir=diffusers', '--out=vae'],
      EXTRACT,
      ['rm', shard],
      EXTRACT,
      TRAIN + ['--config.total_steps=2'],
      TRAIN + ['--config.total_steps=3'],
  ]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-c', RUNNER, json.dumps(commands)],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert sorted(os.listdir(tmp_path / 'vae')) == ['config.json', 'model.safetensors']
  manifest = json.loads((tmp_path / 'latents' / 'manifest.json').read_text())
  assert manifest['num_images'] == 21 and manifest['num_shards'] == 3
  # the second extraction redid only the removed shard
  log = proc.stderr
  runs = re.split(r'^\$ python ', log, flags=re.M)  # one log per command, as echoed
  first, second = [r for r in runs if r.startswith(EXTRACT[0])]
  assert (tmp_path / shard).is_file() and 'already finished' not in first
  done = [f'shard {i}/3 already finished, skipped' in second for i in (1, 2, 3)]
  assert done == [True, False, True], second[-3000:]
  assert 'resuming from step 2' in log
  work = tmp_path / 'runs' / 'lat'
  assert sorted(os.listdir(work / 'checkpoints')) == ['2', '3']
  # config.json names the data and the VAE so that a resume from any folder finds them
  data = json.loads((work / 'config.json').read_text())['data']
  assert data['path'] == str(tmp_path / 'latents') and data['vae'] == str(tmp_path / 'vae')
