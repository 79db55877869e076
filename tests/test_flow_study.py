"""The flow-matching study's driver on a tiny budget: runs, sweep, resume and report.

Training is stood in for (random weights handed to the step callbacks): both objectives' real
training runs are tested in test_flow_training.py and test_training.py, and compiling two train
steps here would double this test's time.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdt_jax.models.mdt import MDTConfig
from studies import flow_matching as fm
from studies import flow_report
from studies import learning_curves as lc
from mdt_jax.models.params import abstract_model
from mdt_jax.training.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_config():
  """configs/flow_matching.py shrunk to seconds: tiny model, 4 steps, 20 samples, 1 seed, the
  DDPM baseline and flow without the masked branch, one sampler each in the sweep."""
  spec = importlib.util.spec_from_file_location(
      'fm_config', os.path.join(ROOT, 'configs', 'flow_matching.py')
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.model.update(hidden_size=32, depth=2, num_heads=2, decode_layer=0)
  c.train.update(global_batch_size=16, total_steps=4, checkpoint_every_steps=4, log_every_steps=2)
  c.seeds, c.eval_every_steps, c.eval_num_samples = (1,), 2, 20
  del c.variants['mdt_flow']
  c.curve_samplers = dict(ddpm='dpm_solver++:2', flow='heun:2')
  c.final_samplers = dict(ddpm=['dpm_solver++:2'], flow=['heun:2'])
  c.target_reference = 'dpm_solver++:2'
  return c


def stand_in_training(config, workdir, callbacks=()):
  """train_and_evaluate's contract for the study: the callbacks see every step's state."""
  del workdir
  abstract = nnx.to_pure_dict(
      nnx.state(abstract_model(MDTConfig.from_dict(config.model.to_dict())))
  )
  rng = np.random.default_rng(config.seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype), abstract)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=(),
      rng=jnp.zeros((2,), jnp.uint32),
  )
  for step in range(1, config.total_steps + 1):
    for cb in callbacks:
      cb(step, state)
  return {'step': config.total_steps, 'loss': 1.0 + config.mask_branch, 'state': state}


def test_tiny_study_runs_sweeps_resumes_and_reports(tmp_path, monkeypatch):
  monkeypatch.setattr(lc, 'train_and_evaluate', stand_in_training)
  out = str(tmp_path / 'flow')
  results = fm.run_study(study_config(), out, workdir_root=str(tmp_path))
  with open(out + '.json') as f:
    saved = json.load(f)
  runs = {r['variant']: r for r in saved['runs']}
  assert sorted(runs) == ['dit_flow', 'mdt_ddpm']
  assert runs['mdt_ddpm']['objective'] == 'ddpm' and runs['mdt_ddpm']['mask_branch']
  assert runs['dit_flow']['objective'] == 'flow' and not runs['dit_flow']['mask_branch']
  for r in runs.values():
    assert r['steps'] == [2, 4] and np.all(np.isfinite(r['fd']))
  assert list(runs['mdt_ddpm']['sweep']) == ['dpm_solver++:2']
  sweep = runs['dit_flow']['sweep']['heun:2']
  assert sweep['model_evaluations'] == 2 and sweep['fd'] > 0
  assert 0 <= sweep['class_accuracy'] <= 1
  # The curve's last point and the sweep use the same sampler and weights: the same numbers.
  assert sweep['fd'] == pytest.approx(runs['dit_flow']['fd'][-1])
  assert saved['sweep']['dit_flow']['heun:2']['fd']['mean'] == [sweep['fd']]
  target = saved['target']
  assert target['reference'] == 'dpm_solver++:2' and 'dit_flow' in target['variants']
  assert results['summary']['reach_baseline_final']['fd']['target'] == pytest.approx(
      runs['mdt_ddpm']['fd'][-1]
  )

  # A second invocation with the same config keeps the finished runs: nothing is trained.
  monkeypatch.setattr(fm, 'run_one', lambda *a, **k: pytest.fail('trained again'))
  again = fm.run_study(study_config(), out)
  assert again['summary'] == results['summary']

  png, md = flow_report.write(again, out, 'python tools/flow_matching.py --out=x')
  assert os.path.getsize(png) > 10_000
  text = open(md).read()
  assert '| flow, no masked branch | heun | 2 |' in text and 'Target:' in text


def test_bad_study_is_refused_before_training():
  c = study_config()
  c.baseline = 'mdt_flow'
  with pytest.raises(ValueError, match='baseline'):
    fm.check_study(c)
  c = study_config()
  c.final_samplers.flow = ['ddpm:50']
  with pytest.raises(ValueError, match='samplers that fit'):
    fm.check_study(c)
  c = study_config()
  c.final_samplers.flow = ['heun']
  with pytest.raises(ValueError, match='name:steps'):
    fm.check_study(c)
