"""The representation-alignment study's driver on a tiny budget: the variant table, the
teacher, resume and report.

Training is stood in for (random weights of each variant's model, projector included, handed to
the step callbacks): aligned training itself is tested in test_align_training.py.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdt_jax.models.params import abstract_model
from mdt_jax.training.run import as_run
from mdt_jax.training.state import TrainState
from studies import alignment_report
from studies import learning_curves as lc
from studies import representation_alignment as ra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_config():
  """configs/representation_alignment.py shrunk to seconds: tiny model, 4 steps, 20 samples, 2
  seeds, the teacher trained for one epoch."""
  spec = importlib.util.spec_from_file_location(
      'ra_config', os.path.join(ROOT, 'configs', 'representation_alignment.py')
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.model.update(hidden_size=32, depth=4, num_heads=2, decode_layer=2)
  c.train.update(global_batch_size=16, total_steps=4, checkpoint_every_steps=4, log_every_steps=2)
  c.train.sampling.steps = 2
  c.seeds, c.eval_every_steps, c.eval_num_samples = (1, 2), 2, 20
  c.align.projector_dim = 16
  c.teacher.epochs = 1
  return c


def stand_in_training(config, workdir, callbacks=()):
  """train_and_evaluate's contract for the study: the callbacks see every step's state."""
  del workdir
  abstract = nnx.to_pure_dict(nnx.state(abstract_model(as_run(config).model)))
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
  return {'step': config.total_steps, 'loss': 1.0, 'state': state}


def test_tiny_study_runs_every_variant_resumes_and_reports(tmp_path, monkeypatch):
  monkeypatch.setattr(lc, 'train_and_evaluate', stand_in_training)
  monkeypatch.setattr(ra, 'enable_compilation_cache', lambda path: None)  # no global setting
  out = str(tmp_path / 'align')
  results = ra.run_study(study_config(), out, workdir_root=str(tmp_path))
  with open(out + '.json') as f:
    saved = json.load(f)
  runs = {(r['variant'], r['seed']): r for r in saved['runs']}
  assert sorted({v for v, _ in runs}) == sorted(study_config().variants)
  assert runs[('dit_repa', 1)]['method'] == 'repa' and not runs[('dit_repa', 1)]['mask_branch']
  assert runs[('mdt_repa_both', 2)]['branches'] == 'both'
  for r in runs.values():
    assert r['steps'] == [2, 4] and np.all(np.isfinite(r['fd']))
  # the projector's width is the teacher's (64) for REPA, the model's (32) for SRA
  n = saved['num_params']
  assert n['mdt'] < n['mdt_sra'] < n['mdt_repa'] == n['dit_repa'] == n['mdt_repa_both']
  teacher = saved['teacher']
  assert teacher['hidden_size'] == 64 and 0 <= teacher['test_accuracy'] <= 1
  assert saved['masked_branch_pairs'] == [['mdt_repa', 'mdt_repa_both']]
  reach = results['summary']['reach_baseline_final']['fd']
  assert reach['target'] == pytest.approx(np.mean([runs[('mdt', s)]['fd'][-1] for s in (1, 2)]))

  # A second invocation with the same config keeps the finished runs: nothing is trained.
  monkeypatch.setattr(lc, 'run_one', lambda *a, **k: pytest.fail('trained again'))
  monkeypatch.setattr(ra.digits_teacher, 'train', lambda *a: pytest.fail('teacher trained again'))
  again = ra.run_study(study_config(), out, workdir_root=str(tmp_path))
  assert again['summary'] == results['summary']

  png, md = alignment_report.write(again, out, 'python tools/representation_alignment.py')
  assert os.path.getsize(png) > 10_000
  text = open(md).read()
  assert '| MDT+REPA, both branches |' in text and 'Aligning the masked branch' in text
  assert 'stand-in for DINOv2' in text and 'unfinished' not in text

  # An unfinished study (seed 2 of one variant missing) is reported over seed 1 alone.
  saved['runs'] = [r for r in saved['runs'] if (r['variant'], r['seed']) != ('mdt_sra', 2)]
  with open(out + '.json', 'w') as f:
    json.dump(saved, f)
  partial = ra.partial_results(study_config(), out)
  assert partial['finished_seeds'] == [1] and {r['seed'] for r in partial['runs']} == {1}
  alignment_report.write(partial, out, 'python tools/representation_alignment.py')
  assert 'unfinished: summarised over seed(s) 1' in open(md).read()


def test_bad_study_is_refused_before_training(tmp_path):
  c = study_config()
  c.baseline = 'dit'
  with pytest.raises(ValueError, match='baseline'):
    ra.check_study(c, '')
  c = study_config()
  c.variants.dit_repa.branches = 'both'  # the masked branch's alignment without the branch
  with pytest.raises(ValueError, match='mask_branch=False'):
    ra.check_study(c, str(tmp_path))
  c = study_config()
  c.variants.mdt_repa = dict(method='repa')
  with pytest.raises(ValueError, match='must set exactly'):
    ra.check_study(c, '')


def test_masked_branch_pairs_and_verdicts():
  c = study_config()
  assert ra.masked_branch_pairs(c) == [('mdt_repa', 'mdt_repa_both')]
  del c.variants['mdt_repa_both']
  assert ra.masked_branch_pairs(c) == []
  stats = lambda m, s: {'mean': [m], 'std': [s]}  # noqa: E731
  res = {
      'study': {'seeds': [0, 1, 2]},
      'summary': {
          'variants': {
              'a': {'fd': stats(40.0, 1.0)},
              'b': {'fd': stats(30.0, 1.0)},
              'c': {'fd': stats(40.5, 1.0)},
          }
      },
  }
  assert alignment_report.compare(res, 'a', 'b', 'fd')[2] == 'better'
  assert alignment_report.compare(res, 'b', 'a', 'fd')[2] == 'worse'
  assert alignment_report.compare(res, 'a', 'c', 'fd')[2] == 'no clear difference'
