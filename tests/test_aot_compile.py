"""tools/aot_compile.py: the real steps compiled for a TPU slice on this CPU host (libtpu from
requirements-test.txt), their figures checked against the analytic FLOPs and state bytes."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from micro_config import get_config
from benchmarks import flops, hlo, tpu
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.training import sharding
from mdt_jax.training.state import abstract_train_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the micro config, wide enough (128) that TPU tile padding of the weights is small (< 5%), with
# one encoder and one decoder block (each block more is seconds of the TPU compiler's time and
# checks nothing new), FSDP over the slice's chips
WIDE = [
    '--config.model.hidden_size=128',
    '--config.model.depth=2',
    '--config.mesh.data=1',
    '--config.mesh.fsdp=-1',
]


def test_slice_names_map_to_compiler_topologies():
  expect = {
      'v4-8': ('v4:2x2x1', 4),
      'v4-128': ('v4:4x4x4', 64),
      'v5p-8': ('v5p:2x2x1', 4),
      'v5p-16': ('v5p:2x2x2', 8),
      'v5p-128': ('v5p:4x4x4', 64),
      'v5p-1024': ('v5p:8x8x8', 512),
      'v5e-1': ('v5e:1x1', 1),
      'v5e-8': ('v5e:2x4', 8),
      'v5e-16': ('v5e:4x4', 16),
      'v5e-256': ('v5e:16x16', 256),
      'v6e-8': ('v6e:2x4', 8),
      'v6e-32': ('v6e:4x8', 32),
      'V5P-8 ': ('v5p:2x2x1', 4),
      'v5p:4x4x12': ('v5p:4x4x12', 192),
  }
  for name, (topology, chips) in expect.items():
    s = tpu.parse_slice(name)
    assert (s.topology, s.chips) == (topology, chips), name
  assert tpu.parse_slice('v5p:4x4x12').name == 'v5p-384'
  assert tpu.parse_slice('v5p-128').wraparound == (True,) * 3  # whole 4x4x4 cube
  assert tpu.parse_slice('v5p-64').wraparound == (False,) * 3  # 2x4x4
  assert tpu.parse_slice('v5e-128').wraparound == (False, True, False)  # 8x16
  for bad in ('v5p-12', 'v5e-2', 'v7-8', 'tpu', 'v4:2x2', 'v5e-512'):
    with pytest.raises(ValueError, match='known slices: v4-8, v4-16') as e:
      tpu.parse_slice(bad)
    assert repr(bad) in str(e.value)


def test_collectives_are_read_from_optimized_hlo():
  mesh = jax.make_mesh((4, 2), ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def f(x, y, z, w):
    return (
        jax.lax.psum(x, 'a'),  # f32[16], groups of 4
        jax.lax.all_gather(y, ('a', 'b'), tiled=True),  # f32[3] -> [24], all 8
        jax.lax.psum_scatter(z, 'b', tiled=True),  # f32[64] -> [32], pairs
        jax.lax.ppermute(w, 'a', [(i, (i + 1) % 4) for i in range(4)]),
        jax.lax.all_to_all(w.reshape(4, 5), 'a', 0, 0, tiled=True),
    )

  fn = jax.jit(
      jax.shard_map(
          f,
          mesh=mesh,
          in_specs=(P(), P(('a', 'b')), P(), P()),
          out_specs=(P(),) * 5,
          check_vma=False,
      )
  )
  text = fn.lower(jnp.zeros(16), jnp.zeros(24), jnp.zeros(64), jnp.zeros(20)).compile().as_text()
  got = {c.kind: (c.full_bytes, c.group) for c in hlo.parse_collectives(text, 8)}
  assert got == {
      'all-reduce': (64, 4),
      'all-gather': (96, 8),
      'reduce-scatter': (256, 2),
      'collective-permute': (80, 2),
      'all-to-all': (80, 4),
  }
  summary = hlo.summarize(hlo.parse_collectives(text, 8))
  assert summary['all-reduce']['wire_gb'] == pytest.approx(2 * 3 / 4 * 64 / 1e9)
  assert summary['all-gather']['wire_gb'] == pytest.approx(7 / 8 * 96 / 1e9)


# the form the TPU compiler gives a reduce-scatter (written here after its optimized HLO): a
# fusion whose all-reduce is sliced to this chip's shard by the computation's root
TPU_REDUCE_SCATTER = """
%all-reduce-scatter.3 (input.3: f32[512,128]) -> f32[512,32] {
  %input.3 = f32[512,128]{0,1:T(8,128)} parameter(0)
  %all-reduce.9 = f32[512,128]{0,1:T(8,128)} all-reduce(%input.3), channel_id=7, replica_groups={{0,1,2,3}}, to_apply=%add
  %zero = u32[] constant(0)
  %pid = u32[] partition-id()
  %offset = u32[]{:T(128)} multiply(%pid, %c32)
  ROOT %dynamic-slice.1 = f32[512,32]{0,1:T(8,128)} dynamic-slice(%all-reduce.9, %zero, %offset), dynamic_slice_sizes={512,32}
}

%fused_computation.2 (p: f32[512,128]) -> f32[512,128] {
  %p = f32[512,128]{0,1:T(8,128)} parameter(0)
  %all-reduce.10 = f32[512,128]{0,1:T(8,128)} all-reduce(%p), channel_id=8, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.2 = f32[512,128]{0,1:T(8,128)} dynamic-slice(%all-reduce.10, %zero, %zero), dynamic_slice_sizes={512,128}
}

ENTRY %main (a: f32[512,128]) -> f32[512,32] {
  %a = f32[512,128]{0,1:T(8,128)} parameter(0)
  %all-reduce.11 = f32[512,128]{0,1:T(8,128)} all-reduce(%a), channel_id=9, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %fusion = f32[512,32]{0,1:T(8,128)} fusion(%all-reduce.11), kind=kCustom, calls=%all-reduce-scatter.3
}
"""


def test_mesh_replica_groups_with_device_ids_name_their_axes():
  # a 16 x 4 mesh's groups of 4 along its second axis, as the TPU compiler writes them with a
  # device order (a v5p-128 step with data=16, fsdp=4): 4 chips per group, not all 64
  line = (
      '  %all-gather.7 = bf16[1152,1152]{0,1} all-gather(%convert.1), channel_id=19, '
      "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=16], device_ids=([16,4]T(1,0)) "
      "{'axis_1'}, dimensions={1}, use_global_device_ids=true"
  )
  (c,) = hlo.parse_collectives(line, 64)
  assert (c.kind, c.full_bytes, c.group) == ('all-gather', 1152 * 1152 * 2, 4)
  both = line.replace("{'axis_1'}", "{'axis_1','axis_2'}")
  assert hlo.parse_collectives(both, 64)[0].group == 64


def test_tpu_all_reduce_scatter_fusions_count_as_reduce_scatters():
  got = [(c.kind, c.full_bytes, c.group) for c in hlo.parse_collectives(TPU_REDUCE_SCATTER, 4)]
  full = 512 * 128 * 4
  # sliced to a quarter: a reduce-scatter; sliced whole, or not sliced: all-reduces
  assert got == [('reduce-scatter', full, 4), ('all-reduce', full, 4), ('all-reduce', full, 4)]
  # a reduce-scatter sends half of what an all-reduce of the same array sends
  wire = [c.wire_bytes for c in hlo.parse_collectives(TPU_REDUCE_SCATTER, 4)]
  assert wire == [3 / 4 * full, 2 * 3 / 4 * full, 2 * 3 / 4 * full]


# the collective algorithms the TPU compiler writes into a collective's backend config (taken
# from its optimized HLO for v5p-128, v5e-256 and v6e-256, shortened)
_ALGORITHMS = {
    '"collective_algorithm_config":{"emitter":"1DAllGatherOnMajorDim","debug":"group_size = 4"}': 1,
    '"collective_algorithm_config":{"emitter":"2DAllGatherOnMajorDim","debug":"group_size = 16"}': 2,
    '"collective_algorithm_config":{"emitter":"3DAllGatherOnMajorDim","debug":"group_size = 64"}': 3,
    '"emitter":"RotatedPincerEmitter","debug":"UniDirection1DRingStrategy{colors:2 phases:1': 1,
    '"emitter":"RotatedPincerEmitter","debug":"UniDirectionNDRingStrategy{colors:4 phases:2 '
    'cores:{4 4},{4 4},{4 4},{4 4} nophase0:0 num_dims:2 active_di': 2,
    '"emitter":"RotatedPincerEmitter","debug":"UniDirectionNDRingStrategy{colors:6 phases:3': 3,
    '"emitter":"RotatedPincerEmitter","debug":"StrategyRing{colors:1 phases:1 cores:{16}': 1,
    '"emitter":"AllGatherWithNetRouterEmitter","debug":"group_size = 256': 1,
    '"emitter":"AllToAllEmitter","debug":"max_rdma_size_bytes: 32768"': 1,
    '': 1,
}


def test_collectives_run_over_the_torus_dimensions_their_algorithm_names():
  for config, dims in _ALGORITHMS.items():
    assert hlo.torus_dims(config) == dims, config
  line = (
      '  %all-reduce.3 = f32[1048576]{0} all-reduce(%p), channel_id=3, replica_groups=[1,64]<=[64], '
      'to_apply=%add, backend_config={' + next(iter(k for k, v in _ALGORITHMS.items() if v == 3))
  )
  (c,) = hlo.parse_collectives(line, 64)
  assert (c.kind, c.group, c.dims) == ('all-reduce', 64, 3)
  wire = 2 * 63 / 64 * 4 * 2**20
  assert c.wire_bytes == pytest.approx(wire)
  # three axes' links at once where every axis of the slice closes into a ring; one otherwise
  assert c.seconds(1.8e11, full_torus=True) == pytest.approx(wire / (3 * 1.8e11))
  assert c.seconds(1.8e11, full_torus=False) == pytest.approx(wire / 1.8e11)


def test_the_compiler_runs_a_whole_torus_collective_on_every_axis(tmp_path):
  # all-gathers and all-reduces of 1 MB over one, two and three axes of v5p-128's 4x4x4 torus,
  # compiled for it: the wire bytes read from the HLO are the ring algorithms' (known), and
  # the compiler's algorithm takes as many torus dimensions as the group spans
  script = (
      'import json, sys; from benchmarks import aot, tpu; from mdt_jax.training import cost; '
      's = tpu.parse_slice("v5p-128"); d = s.devices(); '
      'json.dump([cost.torus_dims(d), aot.collective_checks(s, d, megabytes=1)], sys.stdout)'
  )
  proc = subprocess.run(
      [sys.executable, '-c', script],
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tools')])),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  dims, rows = json.loads(proc.stdout.strip().splitlines()[-1])
  assert dims == 3  # the compile-only devices' coordinates: a closed 4x4x4 torus
  rows = {r['program']: r for r in rows}
  n = 2**20 // 4
  for axes, group, dims in (('4', 4, 1), ('4x4', 16, 2), ('4x4x4', 64, 3)):
    gather = rows[f'all-gather f32[{n}] over {axes}']
    reduce = rows[f'all-reduce f32[{n}] over {axes}']
    for r, factor in ((gather, 1), (reduce, 2)):
      assert r['group'] == group and r['torus_dims'] == dims, r
      assert r['known_wire_mb'] == pytest.approx(factor * (group - 1) / group * 4 * n / 1e6)
      assert r['hlo_wire_mb'] == pytest.approx(r['known_wire_mb'])
      assert r['ici_ms'] == pytest.approx(r['ici_one_link_ms'] / dims)


def _run_aot_compile(*flags, out):
  """tools/aot_compile.py on the micro config with `flags`, as a user runs it; its JSON to `out`."""
  proc = subprocess.run(
      [
          sys.executable,
          'tools/aot_compile.py',
          f'--config={ROOT}/tests/micro_config.py',
          *flags,
          f'--out={out}',
      ],
      env=dict(os.environ, PYTHONPATH=ROOT),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def tpu_report(tmp_path_factory):
  """One launch of the tool: the micro config's MDT train step (FSDP over the 4 chips) and a
  guided sampler call compiled for v5p-8, plus the proxy programs."""
  if importlib.util.find_spec('libtpu') is None:
    pytest.fail(
        'libtpu is not installed; these tests compile for a TPU slice with it: '
        'pip install -r requirements-test.txt'
    )
  out = tmp_path_factory.mktemp('aot') / 'aot.json'
  proc = _run_aot_compile(
      *WIDE, '--topology=v5p-8', '--steps=train,sample', '--proxy_checks', '--traffic=8', out=out
  )
  return json.loads(out.read_text()), proc.stdout


def _state_bytes_per_chip(config):
  mc = MDTConfig.from_dict(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:4])  # v5p-8's 4 chips' shape
  structs, _, _ = abstract_train_state(
      mc, make_optimizer(config.optimizer), mesh, config.sharding_rules
  )
  per_chip = lambda s: int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize  # noqa
  state = sum(per_chip(s) for s in jax.tree.leaves(structs))
  # the token matmuls' weights (qkv, proj, fc1, fc2, skip fusion): FSDP gathers them, since
  # all-reducing their [B, N, *] activations would move more (XLA may keep adaLN's sharded);
  # 2-D, which leaves out the patch embedding's convolution (also named proj)
  token_weights = sum(
      int(np.prod(s.shape)) * s.dtype.itemsize
      for path, s in jax.tree_util.tree_flatten_with_path(structs.params)[0]
      if path[-1].key == 'kernel'
      and len(s.shape) == 2
      and any(getattr(k, 'key', None) in ('qkv', 'proj', 'fc1', 'fc2', 'skip_linear') for k in path)
  )
  return mc, state, token_weights


def test_tpu_train_step_figures_match_analytic_counts(tpu_report):
  res, stdout = tpu_report
  assert (res['slice'], res['topology'], res['chips']) == ('v5p-8', 'v5p:2x2x1', 4)
  # the compiler's usable HBM, read from its own refusal, is near the spec sheet's 95 GB
  assert 0.9 * 95 < res['hbm_usable_gb'] < 1.15 * 95
  train, sample = res['steps']
  assert (
      train['step'] == 'train: plain+masked (MDT)'
      and train['mesh'] == 'fsdp data=1 fsdp=4 tensor=1 float32'
  )
  config = get_config()
  config.model.hidden_size, config.model.depth, config.mesh.data, config.mesh.fsdp = 128, 2, 1, -1
  mc, state, token_weights = _state_bytes_per_chip(config)
  n, batch = 4, config.global_batch_size
  executed = flops.train_step_flops(mc, batch, True, executed=True) / n / 1e12
  assert train['executed_tflop_per_chip'] == pytest.approx(executed)
  # XLA counts the executed program plus the elementwise work the matmul-only count leaves out
  assert executed <= train['xla_tflop_per_chip'] <= 1.3 * executed
  # arguments: the train state's shard (params, EMA, optimizer) and the batch's, per chip;
  # the TPU's (8, 128) tiles pad a few small arrays (relative position tables, biases)
  batch_bytes = batch // n * (mc.input_size**2 * mc.in_channels * 4 + 4)
  assert 1.0 <= train['memory_args_gb'] * 1e9 / (state + batch_bytes) < 1.05
  # the donated state is written in place (aliased), not held twice
  assert 1.0 <= train['memory_alias_gb'] * 1e9 / state < 1.05
  # FSDP: the token matmuls' weights are gathered for the forward pass at least once
  assert train['collectives']['all-gather']['gb'] * 1e9 >= token_weights
  # ... and their float32 gradients reduce-scattered back to the shards, not all-reduced
  assert train['collectives']['reduce-scatter']['gb'] * 1e9 >= token_weights
  assert train['ici_ms'] > 0 and train['fits']
  # traced for the TPU's branches (models/platform.py): the one-hot relative-position bias, no
  # gather or scatter-add loop (the CPU's branch compiles to while loops on a TPU)
  assert train['while_loops'] == 0
  assert 0 < train['hbm_estimate_gb'] <= train['bytes_accessed_gb']
  peak = res['peak_bf16_tflops'] * 1e12
  bound_s = max(train['compute_ms'], train['hbm_ms'], train['ici_ms']) / 1e3
  assert train['mfu_bound'] == pytest.approx(
      train['model_tflop_per_chip'] * 1e12 / (bound_s * peak)
  )
  # the roofline's HBM is the HBM-only traffic; XLA's bytes accessed gives the _xla figures
  assert train['hbm_ms'] == pytest.approx(train['hbm_estimate_gb'] / res['hbm_gbps'] * 1e3)
  assert train['hbm_xla_ms'] == pytest.approx(train['bytes_accessed_gb'] / res['hbm_gbps'] * 1e3)
  # v5p-8's 2x2x1 torus has no wraparound: every collective over one link, both ways
  one_link_ms = train['collective_wire_gb'] / res['ici_link_gbps'] * 1e3
  assert train['ici_ms'] == pytest.approx(one_link_ms)
  assert train['ici_one_link_ms'] == pytest.approx(one_link_ms)
  bound_xla_s = max(train['compute_ms'], train['hbm_xla_ms'], train['ici_one_link_ms']) / 1e3
  assert train['mfu_bound_xla'] == pytest.approx(
      train['model_tflop_per_chip'] * 1e12 / (bound_xla_s * peak)
  )
  # the sampler: one guided call runs the model on [x; x] (2B rows), weights replicated and
  # the batch split, so no chip talks to another
  fwd = 2 * flops.forward_flops(mc) * batch / n / 1e12
  assert sample['model_tflop_per_chip'] == pytest.approx(fwd)
  assert fwd <= sample['xla_tflop_per_chip'] <= 1.3 * fwd
  assert sample['collectives'] == {} and sample['ici_ms'] == 0
  assert (
      '| train: plain+masked (MDT) | v5p-8 | fsdp data=1 fsdp=4 tensor=1 float32 | 16 |' in stdout
  )
  # where the bytes go: tied to this project's source lines through the HLO's stack frames
  sources = dict(train['traffic']['by_source'])
  # the attention: on a TPU the fused kernel of models/attention.py; the dense layers past the
  # backend dispatch (models/platform.py), which is never named
  assert any(s.startswith('models/attention.py:') for s in sources), sorted(sources)
  assert any(s.startswith('models/layers.py:') and 'Dense' in s for s in sources), sorted(sources)
  assert not any(s.startswith('models/platform.py') for s in sources), sorted(sources)
  assert 0.3 * train['bytes_accessed_gb'] < train['traffic']['total_gb']


def test_roofline_proxy_on_programs_with_known_answers(tpu_report):
  rows = {r['program']: r for r in tpu_report[0]['proxy']}
  mm = rows['bf16 matmul']
  assert mm['bottleneck'] == 'compute' and mm['xla_gflop'] == pytest.approx(mm['known_gflop'])
  assert mm['bytes_over_min'] == pytest.approx(1.0, rel=0.01)
  chain = rows['f32 elementwise chain']
  assert chain['bottleneck'] == 'HBM' and chain['bytes_over_min'] == pytest.approx(1.0, rel=0.01)
  # a token matmul whose input XLA prefetches into on-chip memory: XLA counts the on-chip
  # copy's traffic too (an over-count of HBM traffic); the HBM-only estimate does not
  tall = rows['bf16 matmul [16384,1152]x[1152,1152]']
  assert tall['bytes_over_min'] > 1.5
  assert tall['hbm_estimate_over_min'] == pytest.approx(1.0, rel=0.01)
  # XL/2's MLP matmul at 4 samples a chip, float32: the weight prefetched (XLA: 2.9x the known
  # traffic), read once by the HBM-only estimate, which the roofline takes
  fc1 = rows['f32 matmul [1024,1152]x[1152,4608]']
  assert fc1['bytes_over_min'] > 2.0
  assert fc1['hbm_estimate_over_min'] == pytest.approx(1.0, rel=0.01)
  assert fc1['hbm_ms'] == pytest.approx(fc1['min_hbm_mb'] / 1e3 / 2765 * 1e3, rel=0.01)
  # a fusion that reads 1/64 of its operand (as a sharded optimizer update reads an all-reduced
  # gradient): the HBM estimate charges the slice, not the operand
  part = rows['f32 dynamic slice of 1/64 of x, fused']
  assert part['hbm_estimate_over_min'] == pytest.approx(1.0, rel=0.01)
  # in place: XLA counts only the updated block (the HBM estimate, the whole buffer)
  assert rows['dynamic_update_slice, donated']['bytes_over_min'] == pytest.approx(1.0, rel=0.01)
  # a loop body is counted once, whatever the trip count (an under-count, BENCHMARKS.md)
  assert rows['fori_loop x10 elementwise']['bytes_over_min'] < 0.5
  # collectives over v5p-8's open 2x2x1 torus: the ring algorithms' bytes, over one link
  colls = tpu_report[0]['collective_proxy']
  assert {r['group'] for r in colls} == {2, 4}
  for r in colls:
    assert r['hlo_wire_mb'] == pytest.approx(r['known_wire_mb'])
    assert r['ici_ms'] == pytest.approx(r['ici_one_link_ms'])


def test_a_step_too_large_for_the_chip_is_reported_not_fitting(tmp_path):
  # one guided call of the micro model on 2 x 262144 rows: about 25 GB, a v5e chip has 16 GB;
  # the compiler refuses it, the tool reports the refusal's figures as a row
  out = tmp_path / 'refused.json'
  proc = _run_aot_compile(
      '--config.model.hidden_size=128',
      '--topology=v5e-1',
      '--steps=sample',
      '--sample_batch=262144',
      out=out,
  )
  (row,) = json.loads(out.read_text())['steps']
  assert row['fits'] is False and row['global_batch'] == 262144
  assert 0.9 * 16 < row['hbm_usable_gb'] < 1.15 * 16 < row['memory_peak_estimate_gb']
  assert 'sample: one guided model call: does not fit: the compiler refused it' in proc.stdout
