"""The flow-matching study's driver on a tiny budget: runs, sweep, resume and report."""
import importlib.util
import json
import os

import numpy as np
import pytest

from mdt_jax.studies import flow_matching as fm
from mdt_jax.studies import flow_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_config():
  """configs/flow_matching.py shrunk to seconds: tiny model, 4 steps, 20 samples, 1 seed, the
  DDPM baseline and flow without the masked branch, one sampler each in the sweep."""
  spec = importlib.util.spec_from_file_location(
      'fm_config', os.path.join(ROOT, 'configs', 'flow_matching.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.model.update(hidden_size=32, depth=2, num_heads=2, decode_layer=0)
  c.train.update(global_batch_size=16, total_steps=4, checkpoint_every_steps=4,
                 log_every_steps=2)
  c.seeds, c.eval_every_steps, c.eval_num_samples = (1,), 2, 20
  del c.variants['mdt_flow']
  c.curve_samplers = dict(ddpm='dpm_solver++:2', flow='heun:2')
  c.final_samplers = dict(ddpm=['ddpm:3'], flow=['heun:2'])
  c.target_reference = 'ddpm:3'
  return c


def test_tiny_study_runs_sweeps_resumes_and_reports(tmp_path, monkeypatch):
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
  assert list(runs['mdt_ddpm']['sweep']) == ['ddpm:3']
  sweep = runs['dit_flow']['sweep']['heun:2']
  assert sweep['model_evaluations'] == 2 and sweep['fd'] > 0
  assert 0 <= sweep['class_accuracy'] <= 1
  # The curve's last point and the sweep use the same sampler and weights: the same numbers.
  assert sweep['fd'] == pytest.approx(runs['dit_flow']['fd'][-1])
  assert saved['sweep']['dit_flow']['heun:2']['fd']['mean'] == [sweep['fd']]
  target = saved['target']
  assert target['reference'] == 'ddpm:3' and 'dit_flow' in target['variants']
  assert results['summary']['reach_baseline_final']['fd']['target'] == \
      pytest.approx(runs['mdt_ddpm']['fd'][-1])

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
