"""Benchmark the MDTv2 train step (MDT two-branch vs DiT-style) and the samplers.

  python tools/bench.py --config=configs/mdtv2_xl2.py --config.model.dtype=bfloat16 \
      --config.global_batch_size=32 --out=bench.json [--sampling] [--profile=DIR]

  # is the TPU attention kernel's training signal XLA's? (on a CPU: in interpret mode)
  python tools/bench.py --config=configs/mdtv2_xl2.py --config.model.dtype=bfloat16 \
      --config.model.depth=6 --config.model.attention_impl=pallas --modes= --interpret_kernels \
      --parity=attention_impl=xla

  # is cuDNN attention's training signal the XLA path's? (loss and gradients, same draws)
  python tools/bench.py --config=configs/mdtv2_xl2.py --config.model.dtype=bfloat16 \
      --config.model.attention_impl=cudnn --config.model.mask_buffer_multiple=8 --modes= \
      --parity=attention_impl=xla,mask_buffer_multiple=1 --parity=dtype=float32,attention_impl=xla

  # the train step against the original's in PyTorch (same weights and batch, interleaved)
  python tools/bench.py --config=configs/mdtv2_s2.py --config.global_batch_size=8 --modes=mdt \
      --steps=3 --repeats=5 --torch_train_baseline

Prints Markdown tables and writes JSON. See BENCHMARKS.md for recorded figures.
"""

import contextlib
import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import baselines, fit, parity, tables, timing
from mdt_jax.models import attention
from benchmarks.profile import summarize as summarize_profile

config_flags.DEFINE_config_file('config', None, 'experiment config', lock_config=True)
flags.DEFINE_list('modes', ['mdt', 'dit'], 'train steps to measure: mdt (two branches), dit')
flags.DEFINE_integer('steps', 10, 'train steps per timed repeat')
flags.DEFINE_integer('repeats', 3, 'timed repeats (the median is reported)')
flags.DEFINE_bool('compile_only', False, 'only compile: FLOPs and memory estimates, no timing')
flags.DEFINE_bool('sampling', False, 'also measure sampling throughput')
flags.DEFINE_integer('sample_batch', 16, 'images per sampling run')
flags.DEFINE_integer('ddpm_steps', 250, 'DDPM steps (the original FID setting)')
flags.DEFINE_integer('dpm_steps', 20, 'DPM-Solver++ steps')
flags.DEFINE_bool(
    'torch_baseline',
    False,
    'with --sampling: also time the same guided '
    "DDPM sampler in PyTorch, float32 and eager (the original's way), and report "
    'the speed-up over it',
)
flags.DEFINE_bool(
    'torch_train_baseline',
    False,
    "also time the original's train step in "
    'PyTorch, float32 and eager (both branches, Adan, EMA; '
    'tests/torch_reference/train.py) on the same weights and batch, interleaved '
    "with the JAX step's repeats, and report the speed-up over it",
)
flags.DEFINE_integer(
    'torch_threads', None, "PyTorch's thread count for the baselines (default: torch's own)"
)
flags.DEFINE_bool(
    'single_thread',
    False,
    'run XLA:CPU single-threaded (and PyTorch with '
    '--torch_threads=1): with `taskset -c 0`, both on one core, where the CPU-time '
    'ratio holds however busy the other cores are',
)
flags.DEFINE_bool(
    'eager_baseline',
    False,
    'with --sampling: also time the same guided DDPM '
    'sampler in JAX, float32, op by op without jit (a float32 eager baseline '
    'that needs no PyTorch)',
)
flags.DEFINE_integer(
    'baseline_steps',
    None,
    'time the eager baselines over this many steps '
    'and scale to --ddpm_steps (every step costs the same; default: all)',
)
flags.DEFINE_float('cfg_scale', 3.8, 'guidance scale for the sampling runs')
flags.DEFINE_float(
    'fit_memory_gb',
    None,
    'also find the largest batch per device whose '
    'compiled step fits this many GB (e.g. 80 for an H100), with and without '
    'rematerialisation',
)
flags.DEFINE_integer(
    'fit_max_compiles',
    8,
    'compiles per --fit_memory_gb search (2 give the '
    'affine estimate; on near-affine memory 4 settle the exact batch)',
)
flags.DEFINE_enum(
    'fit_remat',
    'both',
    ['both', 'off', 'on'],
    'rematerialisation settings the --fit_memory_gb search covers',
)
flags.DEFINE_multi_string(
    'parity',
    [],
    'compare the training loss and its gradients with '
    "those of the config's model with these compute options replaced (same "
    'weights, batch and draws), e.g. attention_impl=xla; repeatable',
)
flags.DEFINE_integer('parity_batch', 8, 'batch of the --parity comparison')
flags.DEFINE_bool(
    'interpret_kernels',
    False,
    'run the Pallas TPU attention kernel in interpret '
    'mode (any backend: its results, not its speed), e.g. --parity of '
    'attention_impl=pallas on a CPU',
)
flags.DEFINE_string('out', None, 'JSON file for the results')
flags.DEFINE_string('profile', None, 'write a jax.profiler trace of a few MDT steps here')
FLAGS = flags.FLAGS


def parity_checks(config, record):
  references = [parity.parse_overrides(spec) for spec in FLAGS.parity]  # bad specs fail first
  comparison = parity.Comparison(config, batch_size=FLAGS.parity_batch)
  for reference in references:
    record('parity', comparison.against(reference))


def train_steps(config, record):
  for mode in FLAGS.modes:
    if mode not in ('mdt', 'dit'):
      raise app.UsageError(f'unknown mode {mode!r}; expected mdt or dit')
    record(
        'train',
        timing.bench_train_step(
            config,
            mask_branch=mode == 'mdt',
            steps=FLAGS.steps,
            repeats=FLAGS.repeats,
            compile_only=FLAGS.compile_only,
            torch_baseline=FLAGS.torch_train_baseline,
        ),
    )


def memory_fit(config, record):
  for remat in {'both': (False, True), 'off': (False,), 'on': (True,)}[FLAGS.fit_remat]:
    probed = config.copy_and_resolve_references()  # the runs after it keep the config's remat
    with probed.unlocked():
      probed.model.remat = remat
    record(
        'fit',
        fit.fit_batch(
            probed,
            mask_branch=True,
            budget_gb=FLAGS.fit_memory_gb,
            max_compiles=FLAGS.fit_max_compiles,
        ),
    )


def profile(config, results):
  os.makedirs(FLAGS.profile, exist_ok=True)
  timing.bench_train_step(
      config, mask_branch=True, steps=3, repeats=1, warmup=1, trace_dir=FLAGS.profile
  )
  print(f"profile written to {FLAGS.profile} (open with TensorBoard's profile plugin)")
  try:
    summary = summarize_profile(FLAGS.profile, 'train_step')
  except (ValueError, FileNotFoundError) as e:  # the trace stays for TensorBoard / XProf
    print(f'no summary of {FLAGS.profile}: {e}')
    return
  print(summary.markdown(15))
  results['profile'] = {
      k: v[:30] if isinstance(v, list) else v for k, v in summary.to_json().items()
  }


def sampling(config, record):
  for name, steps in (('ddpm', FLAGS.ddpm_steps), ('dpm_solver++', FLAGS.dpm_steps)):
    record(
        'sampling',
        timing.bench_sampling(
            config, sampler=name, steps=steps, batch=FLAGS.sample_batch, cfg_scale=FLAGS.cfg_scale
        ),
    )
  ddpm = record.results['sampling'][0]
  eager_runs = [('torch', baselines.bench_sampling_torch)] if FLAGS.torch_baseline else []
  if FLAGS.eager_baseline:
    eager_runs.append(('jax', baselines.bench_sampling_eager))
  timed = FLAGS.baseline_steps or FLAGS.ddpm_steps
  for name, bench_fn in eager_runs:
    r = bench_fn(config, steps=timed, batch=FLAGS.sample_batch, cfg_scale=FLAGS.cfg_scale)
    if timed != FLAGS.ddpm_steps:  # per-step cost is constant: scale to the full run
      r.update(
          timed_steps=timed, steps=FLAGS.ddpm_steps, run_s=r['run_s'] * FLAGS.ddpm_steps / timed
      )
      r['images_per_s'] = FLAGS.sample_batch / r['run_s']
    ddpm[f'speedup_vs_{name}_eager_f32'] = ddpm['images_per_s'] / r['images_per_s']
    record('sampling', r)


class Recorder:
  """Appends each result, prints it and rewrites the JSON file (a cut-off run keeps what it has)."""

  def __init__(self, path):
    self.path = path
    self.results = {
        'backend': jax.default_backend(),
        'device_kind': jax.devices()[0].device_kind,
        'device_count': jax.device_count(),
        'parity': [],
        'train': [],
        'sampling': [],
        'fit': [],
    }

  def __call__(self, section, row):
    self.results[section].append(row)
    print(json.dumps(row), flush=True)
    self.dump()

  def dump(self):
    if self.path:
      with open(self.path, 'w') as f:
        json.dump(self.results, f, indent=2)


def main(argv):
  del argv
  config = FLAGS.config
  for flag in ('torch_baseline', 'eager_baseline'):
    if FLAGS[flag].value and not FLAGS.sampling:
      raise app.UsageError(
          f"--{flag} compares samplers: add --sampling (the train step's "
          'baseline is --torch_train_baseline)'
      )
  if FLAGS.torch_train_baseline and (FLAGS.compile_only or not FLAGS.modes):
    raise app.UsageError(
        '--torch_train_baseline times train steps: it needs --modes and no --compile_only'
    )
  if FLAGS.single_thread:  # read when the CPU backend starts, which is still to come
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false'
    ).strip()
    if FLAGS.torch_threads not in (None, 1):
      raise app.UsageError(f'--single_thread with --torch_threads={FLAGS.torch_threads}')
    FLAGS.torch_threads = 1
  if FLAGS.torch_threads:
    import torch

    torch.set_num_threads(FLAGS.torch_threads)
  record = Recorder(FLAGS.out)
  if FLAGS.parity:
    with attention.interpret_kernels() if FLAGS.interpret_kernels else contextlib.nullcontext():
      parity_checks(config, record)
  train_steps(config, record)
  if FLAGS.fit_memory_gb:
    memory_fit(config, record)
  if FLAGS.profile:
    profile(config, record.results)
    record.dump()
  if FLAGS.sampling:
    sampling(config, record)
  res = record.results
  if res['parity']:
    print(tables.markdown_table(res['parity'], parity.PARITY_KEYS))
  if res['train']:
    print(tables.markdown_table(res['train'], tables.TRAIN_KEYS))
  if res['sampling']:
    print(tables.markdown_table(res['sampling'], tables.SAMPLE_KEYS))
  if res['fit']:
    print(tables.markdown_table(res['fit'], tables.FIT_KEYS))
  record.dump()


if __name__ == '__main__':
  app.run(main)
