"""Hub export: train -> export -> load round trips, the official layout, the model card, the Hub
cache and the upload (mocked: no network)."""

import hashlib
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import reference_mdt as ref
import mdt_jax
from micro_config import get_config
from mdt_jax import MDTConfig, model_config
from mdt_jax.hub import export, model_card, official, upload
from mdt_jax.hub.convert import convert_official
from mdt_jax.hub import Pretrained, sampler_config
from mdt_jax.hub.folder import load_model_folder
from mdt_jax.hub.workdir import load_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = 'mdt-jax-tests/mdt-micro'
EVAL = {
    'samples': 'run/samples.npz',
    'reference': 'ref/digits_ref.npz',
    'num_samples': 500,
    'num_reference': 1797,
    'inception_score': 7.25,
    'fid': 12.345678,
    'sfid': 20.5,
    'precision': 0.71,
    'recall': None,
    'notes': ['recall: not computed'],
}

# Runs tools/export_hub.py with huggingface_hub.HfApi replaced by a recorder (no network).
FAKE_HUB_RUNNER = r"""
import json, os, runpy, sys
import huggingface_hub
calls = []
class RecordingApi:
  def __init__(self, token=None):
    calls.append({'call': 'init'})
  def create_repo(self, repo_id, **kw):
    calls.append({'call': 'create_repo', 'repo_id': repo_id, **kw})
    return 'https://hub.invalid/' + repo_id
  def upload_folder(self, **kw):
    root = kw['folder_path']
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs)
    calls.append({'call': 'upload_folder', 'files': files, **{k: str(v) for k, v in kw.items()}})
huggingface_hub.HfApi = RecordingApi
tool = os.path.join(os.environ['MDT_JAX_ROOT'], 'tools', 'export_hub.py')
sys.argv = [tool] + sys.argv[1:]
try:
  runpy.run_path(tool, run_name='__main__')
finally:
  with open(os.environ['HUB_CALLS'], 'w') as f:
    json.dump(calls, f)
"""


def _inputs(cfg, seed=0, b=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, cfg.input_size, cfg.input_size, cfg.in_channels))
  t = rng.integers(0, 1000, b)
  y = rng.integers(0, cfg.num_classes + 1, b)  # the null label included
  return jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.int32), jnp.asarray(y, jnp.int32)


def _out(model, seed=0):
  return np.asarray(model(*_inputs(model.config, seed)))


@pytest.fixture(scope='module')
def run(full_run, tmp_path_factory):
  """The session's micro training run (6 steps, checkpoints at 3 and 6; conftest.full_run)
  exported by the tool, with --push_to_hub mocked. The export only reads the workdir."""
  base = tmp_path_factory.mktemp('export')
  workdir = str(full_run[0])
  os.symlink(workdir, base / 'workdir')  # typed as a relative path below
  eval_json = base / 'metrics.json'
  eval_json.write_text(json.dumps(EVAL))
  out, calls = base / 'mdt-micro', base / 'calls.json'
  env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      MDT_JAX_ROOT=ROOT,
      HUB_CALLS=str(calls),
      HF_HUB_OFFLINE='1',
      JAX_PLATFORMS='cpu',
  )
  # run from the folder that holds the run: every path relative
  proc = subprocess.run(
      [
          sys.executable,
          '-c',
          FAKE_HUB_RUNNER,
          '--workdir',
          'workdir',
          '--out',
          'mdt-micro',
          '--eval_json',
          'metrics.json',
          '--official_layout',
          '--official_formats=safetensors,pt',
          '--push_to_hub',
          REPO_ID,
      ],
      cwd=base,
      env=env,
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(
      base=base, workdir=workdir, out=out, calls=json.loads(calls.read_text()), stdout=proc.stdout
  )


def test_train_export_load_gives_identical_outputs(run):
  assert sorted(os.listdir(run['out'])) == [
      'README.md',
      'config.json',
      'model.safetensors',
      'official',
  ]
  ema = load_workdir(run['workdir'])
  loaded = mdt_jax.hub.load(str(run['out']))
  assert loaded.config == MDTConfig.from_dict(get_config().model.to_dict())
  flat_ema = {
      '.'.join(map(str, p)): np.asarray(v.get_value())
      for p, v in nnx.to_flat_state(nnx.state(ema.model, nnx.Param))
  }
  flat_file = load_file(str(run['out'] / 'model.safetensors'))
  assert sorted(flat_file) == sorted(flat_ema)
  for k in flat_ema:
    np.testing.assert_array_equal(flat_file[k], flat_ema[k], err_msg=k)
  want = _out(ema.model)
  assert np.abs(want).max() > 1e-6  # the trained model does not output zeros
  np.testing.assert_array_equal(_out(loaded.model), want)
  np.testing.assert_array_equal(_out(mdt_jax.load_pretrained(str(run['out']))), want)
  cfg = json.loads((run['out'] / 'config.json').read_text())
  assert cfg['diffusion'] == {'num_timesteps': 1000, 'schedule': 'linear'}
  # the training config's recommendation, guided channels named as every loader reads them
  assert cfg['sampling'] == dict(
      sampler='ddpm', steps=250, cfg_scale=3.8, scale_pow=4.0, guidance_channels='all'
  )
  assert cfg['data'] == {'space': 'pixel', 'image_size': 8, 'image_channels': 1, 'vae': None}
  assert 'step 6 (ema_params)' in cfg['source']


def test_raw_weights_and_step_selection(run, tmp_path):
  out = export.export_workdir(run['workdir'], str(tmp_path / 'raw'), weights='raw', step=3)
  raw = load_workdir(run['workdir'], step=3, weights='params')
  got = _out(load_model_folder(out).model)
  np.testing.assert_array_equal(got, _out(raw.model))
  assert not np.array_equal(got, _out(load_workdir(run['workdir'], step=3).model))  # EMA differs
  # the earlier checkpoint, not the latest (step 6)
  assert not np.array_equal(got, _out(load_workdir(run['workdir'], weights='params').model))
  assert 'raw (not EMA)' in (tmp_path / 'raw' / 'README.md').read_text()
  assert not (tmp_path / 'raw' / 'official').exists()
  with pytest.raises(FileNotFoundError):
    export.export_workdir(run['workdir'], str(tmp_path / 'nostep'), step=7)
  assert not (tmp_path / 'nostep').exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]


def test_model_card_metadata_parses_with_huggingface_hub(run):
  from huggingface_hub import ModelCard

  card = ModelCard.load(str(run['out'] / 'README.md'), ignore_metadata_errors=False)
  d = card.data
  assert d.license == 'apache-2.0' and d.library_name == 'mdt_jax'
  assert d.pipeline_tag == 'unconditional-image-generation'
  assert {'mdt_jax', 'jax', 'class-conditional-image-generation'} <= set(d.tags)
  assert d.model_name == 'mdt-micro'
  got = {r.metric_type: r.metric_value for r in d.eval_results}
  assert got == {'fid': 12.3457, 'sfid': 20.5, 'inception_score': 7.25, 'precision': 0.71}
  assert all(r.dataset_type == 'digits' and r.task_type == d.pipeline_tag for r in d.eval_results)
  assert sorted(d.metrics) == sorted(got)
  text = card.text
  assert '| FID (lower is better) | 12.3457 |' in text
  assert f"load('{REPO_ID}')" in text
  decode_layer = get_config().model.decode_layer
  assert 'official/mdt_official.safetensors' in text and f'decode_layer={decode_layer})' in text
  # the same card survives a save/load cycle of huggingface_hub's own writer
  again = ModelCard(str(card))
  assert again.data.to_dict() == d.to_dict()


def test_push_to_hub_creates_repo_and_uploads_the_folder(run):
  calls = run['calls']
  assert [c['call'] for c in calls] == ['init', 'create_repo', 'upload_folder']
  assert calls[1]['repo_id'] == REPO_ID and calls[1]['exist_ok'] is True
  assert calls[1]['repo_type'] == 'model'
  up = calls[2]
  assert up['repo_id'] == REPO_ID and up['folder_path'] == str(run['out'])
  assert up['files'] == [
      'README.md',
      'config.json',
      'model.safetensors',
      'official/mdt_official.pt',
      'official/mdt_official.safetensors',
  ]
  assert f'uploaded to https://hub.invalid/{REPO_ID}' in run['stdout']


def test_official_layout_exact_keys_reference_forward_and_import(run, tmp_path):
  cfg = load_workdir(run['workdir']).config
  sd = load_file(str(run['out'] / 'official' / 'mdt_official.safetensors'))
  layout, buffers = official.layout(cfg), official.index_buffers(cfg)
  assert sorted(sd) == sorted(list(layout) + buffers)  # strict: nothing more or less
  for k, e in layout.items():
    assert sd[k].shape == e.shape and sd[k].dtype == np.float32, k
  for b in buffers:
    assert sd[b].dtype == np.int64
    np.testing.assert_array_equal(sd[b], ref.rel_index(cfg.grid))
  import torch

  pt = torch.load(str(run['out'] / 'official' / 'mdt_official.pt'), weights_only=True)
  assert sorted(pt) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(pt[k].numpy(), sd[k], err_msg=k)
  # the official-layout weights compute what the exported model computes (NumPy reference)
  model = mdt_jax.load_pretrained(str(run['out']))
  x, t, y = _inputs(cfg, seed=3)
  want = ref.forward(
      sd,
      np.asarray(x).transpose(0, 3, 1, 2),
      np.asarray(t),
      np.asarray(y),
      heads=cfg.num_heads,
      decode_layer=cfg.decode_layer,
  )
  got = np.asarray(model(x, t, y)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  # import back (without torch: the safetensors file) -> identical outputs
  for name in ('mdt_official.safetensors', 'mdt_official.pt'):
    back = convert_official(str(run['out'] / 'official' / name), str(tmp_path / name))
    np.testing.assert_array_equal(_out(load_model_folder(back).model), _out(model))


def test_official_export_of_random_weights_matches_reference(tmp_path):
  """Every weight nonzero (a barely trained model has near-zero gates): layouts must be exact."""
  cfg = MDTConfig.from_dict(
      model_config(
          'S/2',
          input_size=8,
          in_channels=4,
          hidden_size=32,
          depth=6,
          num_heads=4,
          decode_layer=2,
          num_classes=10,
      ).to_dict()
  )
  sd = ref.random_state_dict(official.layout(cfg), official.index_buffers(cfg), cfg.grid, seed=5)
  model = official.model_from_state(sd, cfg)
  files = export.write_official(str(tmp_path), nnx.state(model, nnx.Param), cfg)
  assert files == ['official/mdt_official.safetensors']
  back = load_file(str(tmp_path / files[0]))
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def _fake_hub_cache(cache, repo_id, folder):
  """Lay `folder` out as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
  repo = cache / ('models--' + repo_id.replace('/', '--'))
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  for d, _, files in os.walk(folder):
    for f in files:
      rel = os.path.relpath(os.path.join(d, f), folder)
      data = open(os.path.join(d, f), 'rb').read()
      blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
      blob.parent.mkdir(parents=True, exist_ok=True)
      blob.write_bytes(data)
      link = repo / 'snapshots' / commit / rel
      link.parent.mkdir(parents=True, exist_ok=True)
      link.symlink_to(os.path.relpath(blob, link.parent))
  (repo / 'refs').mkdir(parents=True, exist_ok=True)
  (repo / 'refs' / 'main').write_text(commit)
  return commit


def test_load_pretrained_from_hub_cache_offline(run, tmp_path, monkeypatch):
  import huggingface_hub
  from huggingface_hub import constants

  cache = tmp_path / 'hub'
  commit = _fake_hub_cache(cache, REPO_ID, run['out'])
  info = huggingface_hub.scan_cache_dir(cache)  # the layout is the library's own
  (repo,) = info.repos
  assert repo.repo_id == REPO_ID and [r.commit_hash for r in repo.revisions] == [commit]
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.chdir(tmp_path)  # no local folder of that name
  want = _out(load_model_folder(str(run['out'])).model)
  np.testing.assert_array_equal(_out(mdt_jax.load_pretrained(REPO_ID)), want)
  with pytest.raises(FileNotFoundError, match='mdt-jax-tests/not-cached'):
    mdt_jax.load_pretrained('mdt-jax-tests/not-cached')
  # a cached snapshot without the weights is not taken for a model
  other = tmp_path / 'partial'
  other.mkdir()
  (other / 'config.json').write_text((run['out'] / 'config.json').read_text())
  _fake_hub_cache(cache, 'mdt-jax-tests/partial', other)
  with pytest.raises(FileNotFoundError, match='mdt-jax-tests/partial'):
    mdt_jax.load_pretrained('mdt-jax-tests/partial')


def test_card_usage_code_runs_offline_against_the_hub_cache(run, tmp_path):
  text = (run['out'] / 'README.md').read_text()
  usage = text[text.index('## Usage') :]
  code = re.search(r'```python\n(.*?)```', usage, re.S).group(1)
  cache = tmp_path / 'hub'
  _fake_hub_cache(cache, REPO_ID, run['out'])
  env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      HF_HUB_CACHE=str(cache),
      HF_HUB_OFFLINE='1',
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='',
  )
  proc = subprocess.run(
      [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  from PIL import Image

  grid = np.asarray(Image.open(tmp_path / 'samples.png'))
  assert grid.shape == (8, 8 * 8 + 7 * 2, 3)  # one row of 8 samples, 2-pixel gutters
  assert 'wrote samples.png (8, 8, 8, 3)' in proc.stdout


def test_evaluation_json_mapping_is_tolerant_and_explicit(tmp_path):
  p = tmp_path / 'e.json'
  p.write_text(
      json.dumps(
          {'metrics': {'FID': 3.5, 'IS': 250, 'sfid': None, 'kid': 0.1}, 'num_samples': 50000}
      )
  )
  ev = model_card.read_evaluation(str(p))
  assert [(m.type, v) for m, v in ev['metrics']] == [('fid', 3.5), ('inception_score', 250.0)]
  assert ev['num_samples'] == 50000
  p.write_text(json.dumps({'fid': 'low'}))
  with pytest.raises(ValueError, match="'fid' must be a finite number"):
    model_card.read_evaluation(str(p))
  p.write_text(json.dumps({'fid': float('nan')}))
  with pytest.raises(ValueError, match='finite number'):
    model_card.read_evaluation(str(p))
  p.write_text(json.dumps({'accuracy': 0.9}))
  with pytest.raises(ValueError, match='holds none of the metrics'):
    model_card.read_evaluation(str(p))
  p.write_text('[1, 2]')
  with pytest.raises(ValueError, match='must hold an object'):
    model_card.read_evaluation(str(p))


def test_imagenet_latent_card(tmp_path):
  """The card of an ImageNet latent model: dataset id, VAE, eval results, CLI with --vae."""
  from huggingface_hub import ModelCard

  cfg = MDTConfig.from_dict(model_config('XL/2', decode_layer=4).to_dict())
  data_cfg = dict(name='latents', image_size=256)
  p = tmp_path / 'm.json'
  p.write_text(
      json.dumps(
          {
              'fid': 1.58,
              'inception_score': 314.7,
              'num_samples': 50000,
              'reference': '/data/VIRTUAL_imagenet256_labeled.npz',
          }
      )
  )
  ev = model_card.read_evaluation(str(p))
  meta = model_card.card_metadata(
      config=cfg, data_cfg=data_cfg, license='cc-by-nc-4.0', model_name='mdtv2-xl2', evaluation=ev
  )
  data = dict(space='latent', image_size=256, vae='stabilityai/sd-vae-ft-ema')
  text = model_card.card_text(
      metadata=meta,
      config=cfg,
      model_ref='me/mdtv2-xl2',
      title='MDTv2-XL/2',
      data=data,
      diffusion={'num_timesteps': 1000},
      sampling={},
      training={'steps': 1},
      evaluation=ev,
      official_files=['official/mdt_official.pt'],
  )
  card = model_card.parse_card(text)
  assert card.data.datasets == ['ILSVRC/imagenet-1k'] and card.data.license == 'cc-by-nc-4.0'
  r = {e.metric_type: e for e in card.data.eval_results}
  assert r['fid'].metric_value == 1.58 and r['inception_score'].metric_value == 314.7
  assert r['fid'].dataset_name == 'ImageNet 256x256' and r['fid'].dataset_type == 'imagenet-1k'
  assert '742,263,904' in card.text  # the released checkpoint's count
  assert '--vae=VAE_FOLDER' in card.text and 'sd-vae-ft-ema' in card.text
  assert 'MDTv2(input_size=32, patch_size=2, in_channels=4, hidden_size=1152' in card.text
  assert '(50000 samples, reference `VIRTUAL_imagenet256_labeled.npz`)' in card.text
  assert ModelCard(text).data.to_dict() == card.data.to_dict()
  with pytest.raises(ValueError, match='Invalid `model_index`'):  # the checker is not blind
    model_card.parse_card(text.replace('    metrics:\n', '    metricz:\n', 1))


def test_recommended_sampling_settings_are_normalised_and_checked():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      'quickstart', os.path.join(ROOT, 'configs', 'quickstart.py')
  )
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  qs = quickstart.get_config().sampling.to_dict()  # 1 channel, scale_pow 0
  got = export.checked_sampling(qs, 1, 1000)
  # scale_pow 0 weights every step by (1 - cos(pi)) / 2 = 1: constant guidance
  assert got == dict(
      sampler='ddpm',
      steps=qs['steps'],
      cfg_scale=2.0,
      guidance_schedule='constant',
      guidance_channels='all',
  )
  pre = Pretrained(
      model=None,
      config=MDTConfig(in_channels=1),
      data={},
      sampling=qs,
      diffusion={'num_timesteps': 1000},
      meta={},
  )
  sc = sampler_config(pre, steps=20)
  assert (sc.sampler, sc.steps, sc.cfg_scale, sc.guidance_schedule, sc.guided_channels) == (
      'ddpm',
      20,
      2.0,
      'constant',
      'all',
  )
  base = dict(sampler='ddpm', steps=250, cfg_scale=3.8, scale_pow=4.0, guidance_channels=3)
  assert export.checked_sampling(base, 4, 1000)['guidance_channels'] == 'first3'
  with pytest.raises(ValueError, match='guidance_channels 0'):
    export.checked_sampling({**base, 'guidance_channels': 0}, 4, 1000)
  with pytest.raises(ValueError, match='not usable'):
    export.checked_sampling({**base, 'sampler': 'euler'}, 4, 1000)


def test_bad_inputs_fail_before_any_work(run, tmp_path):
  wd, out = run['workdir'], str(tmp_path / 'out')
  cases = [
      (dict(weights='best'), ValueError, 'weights must be one of'),
      (dict(license='apache'), ValueError, 'not a Hub license identifier'),
      (dict(license='other'), ValueError, 'needs license_name and license_link'),
      (dict(repo_id='not a repo'), ValueError, 'not a valid Hub repo id'),
      (dict(repo_id='a/b/c'), ValueError, 'not a valid Hub repo id'),
      (dict(official_layout=True, official_formats=('onnx',)), ValueError, 'official formats'),
      (dict(eval_json=str(tmp_path / 'missing.json')), FileNotFoundError, 'missing.json'),
  ]
  for kwargs, err, msg in cases:
    with pytest.raises(err, match=msg):
      export.export_workdir(wd, out, **kwargs)
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    export.export_workdir(str(tmp_path), out)
  with pytest.raises(FileExistsError, match='not empty'):
    export.export_workdir(wd, str(run['out']))
  assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith('.tmp')]
  with pytest.raises(FileNotFoundError, match='not a model folder'):
    upload.push_to_hub(str(tmp_path), REPO_ID, api=object())
