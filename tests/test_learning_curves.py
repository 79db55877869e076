"""The learning-speed study: a reduced end-to-end run, resume, report, and its arithmetic."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import launch
from studies import learning_curves as lc
from studies import curves, page
from studies import learning_report as report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study_config():
  """configs/learning_curves.py, shrunk to seconds: tiny model, 4 steps, 20 samples, 1 seed."""
  spec = importlib.util.spec_from_file_location(
      'lc_config', os.path.join(ROOT, 'configs', 'learning_curves.py')
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.model.update(hidden_size=32, depth=2, num_heads=2, decode_layer=0)
  c.train.global_batch_size = 16
  c.train.total_steps = 4
  c.train.checkpoint_every_steps = 4
  c.train.log_every_steps = 2
  c.seeds = (3,)
  c.eval_every_steps = 2
  c.eval_num_samples = 20
  c.train.sampling.steps = 2
  return c


# study_config() as command-line overrides
STUDY_FLAGS = [
    '--config.train.model.hidden_size=32',
    '--config.train.model.depth=2',
    '--config.train.model.num_heads=2',
    '--config.train.model.decode_layer=0',
    '--config.train.global_batch_size=16',
    '--config.train.total_steps=4',
    '--config.train.checkpoint_every_steps=4',
    '--config.train.log_every_steps=2',
    '--config.seeds=(3,)',
    '--config.eval_every_steps=2',
    '--config.eval_num_samples=20',
    '--config.train.sampling.steps=2',
]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """The reduced study through tools/learning_curves.py, as users run it (the digits classifier
  comes from the session's cache folder, conftest.py)."""
  out = str(tmp_path_factory.mktemp('study') / 'speed')
  proc = launch.run(
      [
          sys.executable,
          os.path.join(ROOT, 'tools', 'learning_curves.py'),
          f'--out={out}',
          f'--workdir_root={tmp_path_factory.mktemp("work")}',
          *STUDY_FLAGS,
      ]
  )
  assert proc.returncode == 0, proc.stdout[-3000:]
  with open(out + '.json') as f:
    results = json.load(f)
  c = study_config()
  assert results['study'] == lc.study_record(c)  # the flags gave study_config()
  return c, out, results, proc.stdout


def test_reduced_study_runs_both_variants_alike(finished):
  c, out, saved, stdout = finished
  assert '\n'.join(report.conclusion(saved)) in stdout  # the tool's summary of the file
  assert os.path.isfile(out + '.png') and os.path.isfile(out + '.md')
  runs = {r['variant']: r for r in saved['runs']}
  assert sorted(runs) == ['dit', 'mdt']
  assert runs['mdt']['mask_branch'] and not runs['dit']['mask_branch']
  for r in runs.values():
    assert r['seed'] == 3 and r['steps'] == [2, 4]
    assert np.all(np.isfinite(r['fd'])) and min(r['fd']) > 0
    assert all(0.0 <= a <= 1.0 for a in r['class_accuracy'])
    assert 0 < r['train_seconds'][0] < r['train_seconds'][1] < r['wall_seconds']
    assert 0 < r['train_cpu_seconds'][0] < r['train_cpu_seconds'][1]
    assert r['seconds_per_step'] > 0 and r['cpu_seconds_per_step'] > 0
    assert np.isfinite(r['final_loss'])
  # Same seed, data and initial weights; MDT's loss is the sum of two branches, each close to
  # the baseline's single one after 4 steps: about twice the baseline's (seen: 2.007)
  ratio = runs['mdt']['final_loss'] / runs['dit']['final_loss']
  assert 1.8 < ratio < 2.2, ratio
  assert saved['reference']['fd_real_images'] < min(runs['dit']['fd'])
  assert saved['num_params'] > 0


def test_finished_runs_are_reused_not_retrained(finished, monkeypatch):
  c, out, results, _ = finished

  def fail(*a, **k):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr(lc, 'run_one', fail)
  again = lc.run_study(study_config(), out)
  assert again['runs'] == results['runs']
  other = study_config()
  other.eval_seed = 1  # another config: the old runs do not count
  with pytest.raises(AssertionError, match='trained again'):
    lc.run_study(other, out)


def test_report_png_markdown_and_kept_discussion(finished):
  _, out, results, _ = finished
  png, md = report.write(results, out, 'python tools/learning_curves.py --out=x')
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  text = open(md).read()
  assert '![learning curves](speed.png)' in text
  assert '| 4 |' in text and 'Conclusion' in text and page.DISCUSSION_MARK in text
  with open(md, 'a') as f:
    f.write('\nHand-written discussion.\n')
  report.write(results, out, 'python tools/learning_curves.py --out=x')
  text = open(md).read()
  assert text.count(page.DISCUSSION_MARK) == 1 and text.endswith('Hand-written discussion.\n')


def test_variants_differ_only_in_mask_branch():
  c = study_config()
  mdt, dit = (lc.variant_config(c, v, 5).to_dict() for v in ('mdt', 'dit'))
  assert mdt.pop('mask_branch') is True and dit.pop('mask_branch') is False
  assert mdt == dit and mdt['seed'] == 5
  with pytest.raises(ValueError, match='variant must be one of'):
    lc.variant_config(c, 'mae', 0)


@pytest.mark.parametrize(
    'change, message',
    [
        (lambda c: setattr(c, 'seeds', ()), 'seeds must be'),
        (lambda c: setattr(c, 'seeds', (1, 1)), 'seeds must be'),
        (lambda c: setattr(c, 'eval_every_steps', 0), 'eval_every_steps'),
        (lambda c: setattr(c, 'eval_num_samples', 1), 'eval_num_samples'),
        (lambda c: c.train.model.update(input_size=8), 'input_size=8'),
        (lambda c: c.train.model.update(mask_ratio=None), 'mask ratio'),
        (lambda c: c.train.sampling.update(sampler='euler'), 'sampler'),
    ],
)
def test_bad_study_is_refused_before_training(change, message):
  c = study_config()
  change(c)
  with pytest.raises(ValueError, match=message):
    lc.check_study(c)


def test_crossing_interpolates_between_evaluations():
  assert curves.crossing([10, 6, 4, 2], 5, 'lower') == pytest.approx(1.5)
  assert curves.crossing([10, 6, 4, 2], 10, 'lower') == 0.0
  assert curves.crossing([10, 6, 4, 2], 1, 'lower') is None
  assert curves.crossing([0.1, 0.3, 0.9], 0.6, 'higher') == pytest.approx(1.5)
  assert curves.crossing([np.nan, 0.2], 0.1, 'higher') == 1.0


def _run(variant, seed, fd, acc, sec_per_step=1.0):
  steps = [100, 200, 300]
  return {
      'variant': variant,
      'seed': seed,
      'steps': steps,
      'fd': fd,
      'class_accuracy': acc,
      'train_seconds': [s * sec_per_step for s in steps],
      'seconds_per_step': sec_per_step,
      'cpu_seconds_per_step': 1.5 * sec_per_step,
      'wall_seconds': 400.0 * sec_per_step,
  }


def _synthetic(mdt_fd, dit_fd, mdt_acc, dit_acc):
  runs = [_run('mdt', s, f, a, 2.0) for s, (f, a) in enumerate(zip(mdt_fd, mdt_acc))]
  runs += [_run('dit', s, f, a, 1.0) for s, (f, a) in enumerate(zip(dit_fd, dit_acc))]
  seeds = list(range(len(mdt_fd)))
  return {'study': {'seeds': seeds}, 'runs': runs, 'summary': curves.summarize(runs, seeds)}


def test_summary_mean_spread_and_steps_to_reach_the_baseline():
  res = _synthetic(
      mdt_fd=[[8, 5, 3], [8, 5, 3]],
      dit_fd=[[10, 8, 6], [12, 8, 4]],
      mdt_acc=[[0.5, 0.8, 0.9], [0.5, 0.8, 0.9]],
      dit_acc=[[0.2, 0.4, 0.6], [0.2, 0.4, 0.6]],
  )
  s = res['summary']
  dit = s['variants']['dit']['fd']
  assert dit['mean'] == [11, 8, 5] and dit['min'] == [10, 8, 4] and dit['max'] == [12, 8, 6]
  assert dit['std'][0] == pytest.approx(np.sqrt(2))
  fd = s['reach_baseline_final']['fd']
  assert fd['target'] == 5
  assert fd['mdt']['step'] == pytest.approx(200) and fd['dit']['step'] == pytest.approx(300)
  assert fd['mdt']['train_seconds'] == pytest.approx(400)  # 2 s per MDT step
  assert fd['dit']['per_seed_steps'] == [None, pytest.approx(275)]
  acc = s['reach_baseline_final']['class_accuracy']
  assert acc['mdt']['step'] == pytest.approx(100 + 100 * (0.6 - 0.5) / 0.3)
  text = ' '.join(report.conclusion(res))
  assert 'better than the baseline' in text and '1.5x the steps' in text
  assert 'step cost 2x a baseline step in wall-clock and 2x in CPU time' in text


def test_conclusion_says_when_masking_does_not_help():
  same = _synthetic(
      mdt_fd=[[9, 7, 5], [11, 9, 6]],
      dit_fd=[[10, 8, 6], [10, 8, 5]],
      mdt_acc=[[0.2, 0.4, 0.6]] * 2,
      dit_acc=[[0.2, 0.4, 0.6]] * 2,
  )
  assert 'no clear difference' in ' '.join(report.conclusion(same))
  worse = _synthetic(
      mdt_fd=[[20, 15, 12], [21, 16, 13]],
      dit_fd=[[10, 8, 6], [10, 8, 5]],
      mdt_acc=[[0.1, 0.2, 0.3]] * 2,
      dit_acc=[[0.2, 0.4, 0.6], [0.2, 0.5, 0.6]],
  )
  text = ' '.join(report.conclusion(worse))
  assert 'worse than the baseline' in text and 'does not reach' in text


def test_summary_refuses_missing_seeds():
  runs = [_run('mdt', 0, [3, 2, 1], [0.1, 0.2, 0.3]), _run('dit', 0, [3, 2, 1], [0.1, 0.2, 0.3])]
  with pytest.raises(ValueError, match='expected'):
    curves.summarize(runs, [0, 1])
