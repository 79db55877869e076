"""A flow-objective latent run end to end: FID during training (a random VAE, a small random
stand-in for the Inception), a preemption inside an evaluation, export, and the sampling CLI."""

import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import launch
import mdt_jax.vae as vae_lib
from micro_config import get_config
from mdt_jax.data import extract, image_sources
from mdt_jax.evaluation import evaluator, inception
from mdt_jax.training import checkpoints, evaluation
from mdt_jax.training.loop import train_and_evaluate
from mdt_jax.training.run import validate
from test_extract import TINY, make_folder


class TinyFeatures(nnx.Module):
  """Stands in for the FID Inception (same call and outputs; 24M weights at 299x299 cost a
  minute per call on a CPU): random projections of 4x4-pooled images."""

  def __init__(self, rngs: nnx.Rngs):
    self.pool_w = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (48, 12)))
    self.spatial_w = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (48, 6)))

  def __call__(self, images):
    x = images.astype(jnp.float32) / 128.0 - 1.0
    n, h, w, c = x.shape
    x = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, -1)
    return {'pool': jnp.tanh(x @ self.pool_w[...]), 'spatial': x @ self.spatial_w[...]}


@pytest.fixture(scope='module')
def latent_flow_run(tmp_path_factory):
  """Tiny VAE, extracted latents, a reference statistics file and a flow config evaluating
  every 2 steps (and a stand-in weights file: only its bytes are hashed)."""
  root = tmp_path_factory.mktemp('flow')
  vae_cfg = vae_lib.VAEConfig.from_dict(TINY)
  vae_lib.io.write_folder(str(root / 'vae'), vae_cfg, vae_lib.random_params(vae_cfg, seed=0))
  make_folder(root / 'images')
  extract.extract(
      image_sources.folder_source(str(root / 'images')),
      vae_lib.load(str(root / 'vae')),
      str(root / 'latents'),
      image_size=16,
      batch_size=8,
      images_per_shard=8,
  )
  (root / 'weights.npz').write_bytes(b'stand-in')
  c = get_config()
  c.data = dict(
      name='latents',
      path=str(root / 'latents'),
      image_size=16,
      flip=False,
      num_threads=1,
      prefetch=2,
      vae=str(root / 'vae'),
  )
  c.model.input_size, c.model.in_channels, c.model.num_classes = 8, 4, 2
  c.model.learn_sigma = False
  c.diffusion.update(objective='flow', min_snr_gamma=None, t_sampling='logit_normal')
  c.sampling.update(sampler='heun', steps=2, cfg_scale=2.0, scale_pow=0.0)
  c.global_batch_size, c.total_steps, c.checkpoint_every_steps = 8, 3, 3
  c.eval_num_samples, c.eval_every_steps = 16, 2
  c.eval_reference, c.eval_inception = str(root / 'ref.npz'), str(root / 'weights.npz')
  return root, c


def reference_file(path, extractor):
  images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
  stats = evaluator.statistics_from_features(extractor(images, progress=False), 'w')
  evaluator.save_statistics(path, stats)


def test_flow_run_fid_preemption_export_and_sampling_cli(latent_flow_run, tmp_path, monkeypatch):
  root, c = latent_flow_run
  model = TinyFeatures(nnx.Rngs(0))
  monkeypatch.setattr(inception, 'load_inception', lambda path: model)
  from mdt_jax.evaluation.features import FeatureExtractor

  reference_file(c.eval_reference, FeatureExtractor(model, 8))
  work = str(tmp_path / 'work')

  # A preemption notice while the step-2 evaluation computes features: the evaluation is
  # abandoned, the loop saves step 2 (not a checkpoint step) and stops.
  real = evaluation.InceptionScorer.features

  def preempted(self, images):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, images)

  monkeypatch.setattr(evaluation.InceptionScorer, 'features', preempted)
  out = train_and_evaluate(c, work)
  assert out['step'] == 2
  assert not os.path.exists(os.path.join(work, evaluation.HISTORY_FILE))
  assert sorted(os.listdir(os.path.join(work, 'checkpoints'))) == ['2']

  # The resume runs the interrupted evaluation first, then trains on and evaluates step 3.
  monkeypatch.setattr(evaluation.InceptionScorer, 'features', real)
  out = train_and_evaluate(c, work)
  assert out['step'] == 3 and np.isfinite(out['loss']) and 'plain/mse' in out
  assert 'plain/vb' not in out and 'masked/loss' in out  # the flow loss, both branches
  with open(os.path.join(work, evaluation.HISTORY_FILE)) as f:
    history = json.load(f)['evaluations']
  assert [e['step'] for e in history] == [2, 3]
  for e in history:
    assert e['eval_num_samples'] == 16 and e['fid'] > 0 and e['sfid'] > 0
    assert 0 <= e['precision'] <= 1 and 0 <= e['recall'] <= 1
  with open(os.path.join(work, evaluation.FINAL_FILE)) as f:
    assert json.load(f)['fid'] == history[-1]['fid']
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(work))

  # Export reads the objective; the sampling CLI takes a flow sampler and refuses DDPM's.
  from mdt_jax import sample
  from mdt_jax.hub import export, load

  folder = str(tmp_path / 'folder')
  export.export_workdir(work, folder)
  with open(os.path.join(folder, 'config.json')) as f:
    cfg = json.load(f)
  assert cfg['diffusion']['objective'] == 'flow' and cfg['sampling']['sampler'] == 'heun'
  assert load(work).diffusion['objective'] == 'flow'
  assert 'flow matching (velocity MSE)' in open(os.path.join(folder, 'README.md')).read()
  ddpm = c.copy_and_resolve_references()
  ddpm.diffusion.objective, ddpm.sampling.sampler = 'ddpm', 'ddpm'
  with pytest.raises(ValueError, match="diffusion.objective: workdir 'flow' vs config 'ddpm'"):
    checkpoints.check_workdir(work, validate(ddpm))  # a resume cannot switch objectives
  samples_dir = tmp_path / 'samples'
  argv = [
      f'--model={folder}',
      f'--out={samples_dir}',
      '--num_samples=3',
      '--sampler=heun',
      '--steps=2',
      '--batch_size=16',
  ]  # the evaluation's program

  def run_cli():
    launch.run_main(sample, *argv)

  run_cli()
  shard = samples_dir / 'shards' / 'shard_00000.npz'
  mtime = shard.stat().st_mtime_ns
  run_cli()  # a restart keeps the finished shard (same run settings)
  assert shard.stat().st_mtime_ns == mtime
  with open(samples_dir / 'run.json') as f:
    run = json.load(f)['sampler']
  assert run['sampler'] == 'heun' and run['objective'] == 'flow'
  assert run['cfg_scale'] == 2.0 and 'eta' not in run
  with np.load(samples_dir / 'samples.npz') as f:
    assert f['arr_0'].shape == (3, 16, 16, 3) and f['arr_0'].std() > 0
  with pytest.raises(ValueError, match='samplers that fit: euler, heun, euler_maruyama'):
    launch.run_main(sample, f'--model={folder}', f'--out={tmp_path / "bad"}', '--sampler=ddpm')
  assert not os.path.exists(tmp_path / 'bad')


def test_evaluation_settings_are_refused_before_training(latent_flow_run, tmp_path):
  root, c = latent_flow_run
  for change, error, match in [
      (dict(eval_reference=''), ValueError, 'needs eval_reference'),
      (dict(eval_num_samples=0), ValueError, 'needs eval_num_samples'),
      (dict(eval_reference=str(root / 'missing.npz')), FileNotFoundError, 'missing.npz'),
      (dict(eval_inception=str(root / 'none.safetensors')), FileNotFoundError, 'convert_inception'),
  ]:
    bad = c.copy_and_resolve_references()
    bad.update(change)
    with pytest.raises(error, match=match):
      train_and_evaluate(bad, str(tmp_path / 'never'))
    assert not os.path.exists(tmp_path / 'never')


def test_a_failing_evaluation_is_recorded_and_training_goes_on(tmp_path):
  c = get_config()
  c.data.image_size, c.eval_num_samples, c.eval_every_steps = 16, 10, 2
  c.model.input_size = 16
  run = validate(c)
  ev = evaluation.Evaluator(run, str(tmp_path))

  class Broken:
    run = validate(c)

    def samples(self, *args, **kwargs):
      raise RuntimeError('out of memory')

  class Writer:

    def write_scalars(self, step, scalars):
      raise AssertionError('nothing to log')

  ev.attach(Broken(), Writer())
  assert ev.missing(2) and ev(2, {}) == {}
  assert ev.history == [{'step': 2, 'error': 'RuntimeError: out of memory'}]
  assert not ev.missing(2)  # a resume does not retry it forever
  with open(tmp_path / evaluation.HISTORY_FILE) as f:
    assert json.load(f)['evaluations'] == ev.history
