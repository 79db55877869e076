"""Compile the real train and sampling steps for a TPU slice, without a TPU.

  pip install -e .[tpu]        # libtpu: the TPU compiler, which runs on any CPU host
  python tools/aot_compile.py --config=configs/mdtv2_xl2.py --topology=v5p-8 \
      --config.model.dtype=bfloat16 --config.mesh.data=1 --config.mesh.fsdp=-1 \
      [--steps=train,dit,sample] [--out=FILE.json] [--hlo_out=DIR] [--fit] [--proxy_checks]

Per chip and per step: analytic model FLOPs and XLA's, HBM bytes accessed, the roofline (compute,
HBM and ICI times, the bottleneck, the MFU bound), memory against the chip's HBM, collectives
by kind and the compile time. Prints Markdown tables (as tools/bench.py) and writes JSON.
See tools/benchmarks/aot.py for what each figure means and BENCHMARKS.md for recorded figures.
"""

import json
import os

# The TPU compiler runs without the TPU backend: keep jax from probing for TPU chips here.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'experiment config', lock_config=True)
flags.DEFINE_string(
    'topology',
    None,
    'TPU slice as named by Cloud TPU (v4-8, v5e-16, v5p-128, '
    "v6e-8, ...) or the compiler's topology (v5p:4x4x12)",
)
flags.DEFINE_list(
    'steps',
    ['train', 'dit', 'sample'],
    'steps to compile: train (MDT two '
    'branches), dit (plain branch only), sample (one guided model call)',
)
flags.DEFINE_integer(
    'sample_batch',
    None,
    "global batch of the sampling step (default: the config's global_batch_size)",
)
flags.DEFINE_bool(
    'fit',
    False,
    'also find the largest batch per chip whose train steps fit the HBM the compiler allows',
)
flags.DEFINE_integer('fit_max_compiles', 4, 'compiles per --fit search')
flags.DEFINE_bool(
    'proxy_checks',
    False,
    'also compile programs whose answer is known (matmuls, '
    'elementwise chains, an in-place update, a loop; all-gathers and all-reduces over '
    "the slice's torus axes) and report what the roofline makes of them",
)
flags.DEFINE_integer(
    'traffic',
    0,
    'also print where the HBM bytes go: this many source lines '
    'and ops with the most traffic (tools/benchmarks/traffic.py)',
)
flags.DEFINE_bool(
    'overlap',
    True,
    'compile with the XLA flags that overlap collectives with compute '
    '(mdt_jax/training/xla_flags.py), as training on a TPU host sets them',
)
flags.DEFINE_integer(
    'search',
    0,
    "compile the cost model's first N strategies and meshes for the slice "
    "(mdt_jax/training/cost.py) instead of the config's, and print their table",
)
flags.DEFINE_string('out', None, 'JSON file for the results')
flags.DEFINE_string('hlo_out', None, 'folder for the optimized HLO of each step')
flags.mark_flags_as_required(['config', 'topology'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mdt_jax import paths
  from mdt_jax.training import xla_flags
  from benchmarks.tables import markdown_table
  from benchmarks import aot, tpu, traffic

  try:
    slc = tpu.parse_slice(FLAGS.topology)
  except ValueError as e:
    raise app.UsageError(str(e))
  unknown = [s for s in FLAGS.steps if s not in aot.STEPS]
  if unknown:
    raise app.UsageError(f'unknown --steps {unknown}; expected some of {list(aot.STEPS)}')
  if FLAGS.fit and not any(s in ('train', 'dit') for s in FLAGS.steps):
    raise app.UsageError('--fit searches the train steps: add train or dit to --steps')
  out = paths.resolve(FLAGS.out) if FLAGS.out else None
  hlo_dir = paths.resolve(FLAGS.hlo_out) if FLAGS.hlo_out else None
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
  if FLAGS.overlap:  # before libtpu loads (slc.devices)
    xla_flags.set_overlap_flags()
  devices = slc.devices()
  usable = tpu.usable_hbm_gb(devices[0])
  g = slc.generation
  results = {
      'slice': slc.name,
      'topology': slc.topology,
      'chips': slc.chips,
      'device_kind': devices[0].device_kind,
      'peak_bf16_tflops': g.peak_bf16_tflops,
      'hbm_gbps': g.hbm_gbps,
      'ici_link_gbps': g.ici_link_gbps,
      'hbm_spec_gb': g.hbm_gb,
      'hbm_usable_gb': usable,
      'steps': [],
      'fit': [],
      'proxy': [],
      'collective_proxy': [],
      'search': [],
  }

  def record(section, row):
    results[section].append(row)
    print(json.dumps(row), flush=True)
    if out:
      with open(out, 'w') as f:
        json.dump(results, f, indent=2)

  if FLAGS.proxy_checks:
    for row in aot.proxy_checks(slc, devices[0]):
      record('proxy', row)
    for row in aot.collective_checks(slc, devices):
      record('collective_proxy', row)
  if FLAGS.search:
    for row in aot.search(FLAGS.config, slc, devices, FLAGS.search, hbm_usable_gb=usable):
      record('search', row)
    print(markdown_table(results['search'], aot.SEARCH_KEYS))
    return
  for step in FLAGS.steps:
    record(
        'steps',
        aot.compile_step(
            FLAGS.config,
            slc,
            devices,
            step,
            sample_batch=FLAGS.sample_batch,
            hbm_usable_gb=usable,
            hlo_dir=hlo_dir,
            traffic_top=FLAGS.traffic,
        ),
    )
  if FLAGS.fit:
    budget = usable or g.hbm_gb
    for step in FLAGS.steps:
      if step != 'sample':
        record(
            'fit',
            aot.fit(FLAGS.config, slc, devices, step, budget, max_compiles=FLAGS.fit_max_compiles),
        )
  if results['proxy']:
    print(markdown_table(results['proxy'], aot.PROXY_KEYS))
  if results['collective_proxy']:
    print(markdown_table(results['collective_proxy'], aot.COLLECTIVE_KEYS))
  if results['steps']:
    print(markdown_table(results['steps'], aot.AOT_KEYS))
  if results['fit']:
    print(markdown_table(results['fit'], aot.FIT_KEYS))
  for row in results['steps']:
    if 'collectives' not in row:  # refused: it does not fit
      print(
          f'{row["step"]}: does not fit: the compiler refused it, {row["memory_peak_estimate_gb"]:.4g}'
          f' GB per chip needed, {row["hbm_usable_gb"]:.4g} GB usable'
      )
      continue
    colls = ', '.join(f'{k} x{v["count"]} {v["gb"]:.3g} GB' for k, v in row['collectives'].items())
    print(f'{row["step"]}: collectives per chip: {colls or "none"}')
    if 'traffic' in row:
      print(f'\n{row["step"]}\n' + traffic.markdown(row['traffic'], row['bytes_accessed_gb']))


if __name__ == '__main__':
  app.run(main)
