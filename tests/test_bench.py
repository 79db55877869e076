"""tools/bench.py runs on a tiny config and reports every field (no timing is asserted)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reference_mdt as ref
from micro_config import get_config
from mdt_jax import MDTConfig, model_config
from benchmarks import baselines, fit, flops, profile, timing
from mdt_jax.hub import official

TINY_SAMPLING = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=4,
    num_heads=2,
    decode_layer=1,
    num_classes=5,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_analytic_flops_match_xla_cost_analysis():
  # wide enough that matmuls dominate, as they do at real sizes
  c = get_config()
  c.model = model_config(
      'S/2',
      input_size=16,
      in_channels=1,
      hidden_size=256,
      depth=2,
      num_heads=4,
      decode_layer=0,
      num_classes=10,
  )
  c.data.image_size = 16
  c.global_batch_size = 8  # one sample per simulated device
  for mask_branch in (True, False):
    r = timing.bench_train_step(c, mask_branch=mask_branch, compile_only=True)
    # XLA counts the executed program: the static buffer, and elementwise work (softmax, GELU,
    # norms, Adan) that the matmul-only analytic count leaves out (1.2x at this width, 1.01x at
    # S/2's)
    assert r['executed_tflop_per_step'] <= r['xla_tflop_per_step'] * 1.02
    assert r['xla_tflop_per_step'] <= r['executed_tflop_per_step'] * 1.3
    assert r['memory_peak_estimate_gb'] > 0


def test_mean_kept_and_flop_counts():
  cfg = MDTConfig.from_dict(get_config().model.to_dict())
  xl = MDTConfig(mask_ratio=0.3)
  assert abs(flops.mean_kept(xl) - 153.1) < 0.05  # E[floor(256 (1 - r))]
  # DiT-XL/2's well-known 118.6 GFLOPs (MACs) forward + MDTv2's extras is ~0.25 TFLOP/sample
  assert 0.24e12 < flops.forward_flops(xl) < 0.27e12
  assert flops.train_step_flops(cfg, 4, True) > flops.train_step_flops(cfg, 4, False)


def test_bench_tool_writes_every_field(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run(
      [
          sys.executable,
          'tools/bench.py',
          f'--config={ROOT}/tests/micro_config.py',
          '--config.model.in_channels=4',  # latents: the original guides 3 of 4
          '--config.data.name=latents',  # of 64 px images: 8x8x4 (the batches are synthetic)
          '--config.data.image_size=64',
          '--steps=2',
          '--repeats=1',
          '--torch_train_baseline',
          '--sampling',
          '--torch_baseline',
          '--eager_baseline',
          '--baseline_steps=2',
          '--sample_batch=2',
          '--ddpm_steps=3',
          '--dpm_steps=2',
          f'--out={out}',
          f'--profile={tmp_path / "trace"}',
          '--parity=dtype=bfloat16',
          # the memory fit, with remat, capped at two compiles (compile only: no timing)
          '--fit_memory_gb=0.5',
          '--fit_remat=on',
          '--fit_max_compiles=2',
      ],
      check=True,
      env=env,
      cwd=ROOT,
      capture_output=True,
      timeout=600,
  )
  res = json.loads(out.read_text())
  [par] = res['parity']
  assert (par['setting'], par['reference']) == ('dtype=float32', 'dtype=bfloat16')
  assert 0 < par['grad_rel_diff'] < 0.05 and 0 < par['masked_loss_rel_diff'] < 0.01
  assert [r['branches'] for r in res['train']] == ['plain+masked (MDT)', 'plain (DiT-style)']
  for r in res['train']:
    for k in (
        'steps_per_s',
        'images_per_s',
        'model_tflop_per_step',
        'xla_tflop_per_step',
        'achieved_tflops_per_device',
        'compile_s',
        'memory_peak_estimate_gb',
        'memory_alias_gb',
    ):
      assert r[k] > 0, k
    # the donated train state is reused for the new state, not held twice
    assert r['memory_alias_gb'] == pytest.approx(r['memory_args_gb'], rel=0.05)
    # the original's step in PyTorch, timed alongside (same weights, batch and branches)
    assert r['torch_images_per_s'] > 0 and r['torch_cpu_s_per_step'] > 0
    assert r['speedup_vs_torch_f32'] == pytest.approx(r['torch_step_s'] / r['step_s'])
    assert r['speedup_vs_torch_f32_cpu_time'] == pytest.approx(
        r['torch_cpu_s_per_step'] / r['cpu_s_per_step']
    )
  assert [r['sampler'] for r in res['sampling']] == [
      'ddpm',
      'dpm_solver++',
      'ddpm (torch eager)',
      'ddpm (JAX eager)',
  ]
  assert all(r['images_per_s'] > 0 for r in res['sampling'])
  (fit,) = res['fit']
  assert fit['remat'] is True and fit['compiles'] == 2 and not fit['exact']
  assert fit['affine_guess_global_batch'] % 8 == 0 and fit['per_sample_gb'] > 0
  assert fit['max_global_batch'] in (0, 16, 32)  # only the two probes were compiled
  for row, name in zip(res['sampling'][2:], ('torch', 'jax')):
    assert row['dtype'] == 'float32' and row['steps'] == 3 and row['timed_steps'] == 2
    assert row['images_per_s'] == pytest.approx(2 / row['run_s'])  # scaled to 3 steps
    assert res['sampling'][0][f'speedup_vs_{name}_eager_f32'] == pytest.approx(
        res['sampling'][0]['images_per_s'] / row['images_per_s']
    )
  traces = [f for _, _, fs in os.walk(tmp_path / 'trace') for f in fs]
  assert any(f.endswith('.xplane.pb') for f in traces)
  # The trace is summarised: the train step's op time, tied to this project's source lines.
  prof = res['profile']
  assert prof['total_ms'] > 0 and prof['planes'] == ['/host:CPU']
  top = [r['source'] for r in prof['by_source'][:5]]
  assert any(s.startswith('mdt_jax/models/layers.py:') for s in top), top
  summary = profile.summarize(str(tmp_path / 'trace'), 'train_step')
  assert sum(t for _, t in summary.by_source) == summary.total_ps
  assert summary.by_op[0][0].startswith('jit_train_step:')
  assert all(t >= 0 for *_, t in summary.by_op)


def test_self_times_subtract_nested_ops():
  # a loop [0, 100) holding two ops [10, 30) and [40, 90), the second holding [50, 60)
  events = [(0, 100), (10, 20), (40, 50), (50, 10), (200, 5)]
  assert profile.self_times(events) == [30, 20, 40, 10, 5]
  # starts read to 256 (an absolute clock): neighbours that seem to overlap are not nested
  assert profile.self_times([(0, 300), (256, 100)]) == [256, 100]
  assert profile.self_times([(0, 300), (256, 100)], slack=256) == [300, 100]
  assert profile.self_times([(0, 300), (0, 100)], slack=256) == [200, 100]


def test_profile_summary_names_a_folder_without_a_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match='no \\*.xplane.pb under'):
    profile.summarize(str(tmp_path))


@pytest.mark.parametrize(
    'curve, budget, most',
    [
        (lambda b: 20.0 + 0.11 * b, 30.0, 4),  # affine: the line is right
        (lambda b: 3.5 + 0.06 * max(b - 24, 0), 10.83, 6),  # flat, then affine (8 CPUs)
        (lambda b: 5.0 + 0.002 * b**1.5, 50.0, 10),  # convex: slower
        (lambda b: 30.0 + 0.1 * b, 10.0, 3),  # nothing fits
    ],
)
def test_fit_batch_search_settles_on_the_largest_batch(monkeypatch, curve, budget, most):
  # The search over compiles, on memory curves given here (one compile each in real use;
  # the compile-based estimate itself runs in test_bench_tool_writes_every_field)
  calls = []
  monkeypatch.setattr(
      fit,
      'memory_estimate_gb',
      lambda c, mask_branch, global_batch, devices: calls.append(global_batch)
      or curve(global_batch),
  )
  r = fit.fit_batch(get_config(), mask_branch=True, budget_gb=budget, max_compiles=12)
  want = max([b for b in range(8, 4000, 8) if curve(b) <= budget], default=0)
  assert r['max_global_batch'] == want and r['max_per_device_batch'] == want // 8
  assert r['exact'] and r['compiles'] == len(set(calls)) <= most, (r, calls)
  assert all(b % 8 == 0 for b in calls)  # multiples of the data-parallel size


def test_torch_baseline_without_sampling_is_refused():
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run(
      [
          sys.executable,
          'tools/bench.py',
          f'--config={ROOT}/tests/micro_config.py',
          '--modes=',
          '--torch_baseline',
      ],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert r.returncode != 0 and '--torch_baseline compares samplers: add --sampling' in r.stderr


def test_eager_ddpm_equals_the_jitted_sampler():
  from mdt_jax.sampling import SamplerConfig, build_sampler

  cfg = MDTConfig(**TINY_SAMPLING)
  sd = ref.random_state_dict(
      official.layout(cfg), official.index_buffers(cfg), cfg.grid, seed=2, scale=0.05
  )  # every weight nonzero: the model steers the samples
  model = official.model_from_state(sd, cfg)
  labels = np.array([1, 2, 0])
  want = build_sampler(model, SamplerConfig(sampler='ddpm', steps=4, cfg_scale=3.0))(
      np.arange(3), labels, 5
  )
  got = np.asarray(baselines.eager_ddpm(model, labels, steps=4, cfg_scale=3.0, seed=5))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  unguided = np.asarray(baselines.eager_ddpm(model, labels, steps=4, cfg_scale=1.0, seed=5))
  assert np.abs(unguided - want).max() > 1e-3  # the guided model output matters


def test_bench_suite_runs_a_selected_benchmark(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable, ONLY='bf16_batch2x')
  r = subprocess.run(
      [
          'bash',
          os.path.join(ROOT, 'tools/bench_suite.sh'),
          'results',
          'tests/micro_config.py',
          '8',
      ],  # OUT_DIR relative to the caller's folder
      env=env,
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=600,
  )
  tmp_path = tmp_path / 'results'
  assert r.returncode == 0, r.stderr
  assert '== bf16_batch2x' in r.stdout and 'exit 0' in r.stdout and 'suite done' in r.stdout
  assert sorted(os.listdir(tmp_path)) == ['bf16_batch2x.json', 'bf16_batch2x.log']
  (row,) = json.loads((tmp_path / 'bf16_batch2x.json').read_text())['train']
  assert row['global_batch'] == 16 and row['dtype'] == 'bfloat16'  # the later flag wins
