"""tools/profile_summary.py's reading of GPU- and TPU-shaped traces, built here as XSpace protos.

(The CPU path runs on a real trace in test_bench.py.)
"""
import gzip
import json
import os

import pytest
from tensorflow.compiler.xla.service import hlo_pb2
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from mdt_jax import profile_summary


def _hlo_module() -> bytes:
  """jit_train_step: fusion.1 (holds a scatter) from layers.py:172 directly, dot.2 from flax's
  Linear called at layers.py:172; copy.3 without a stack."""
  proto = hlo_pb2.HloProto()
  m = proto.hlo_module
  m.name = 'jit_train_step'
  idx = m.stack_frame_index
  idx.file_names.extend(['/w/mdt_jax/models/layers.py', '/v/site-packages/flax/nnx/linear.py'])
  idx.function_names.extend(['Attention.__call__', 'Linear.__call__'])
  idx.file_locations.add(file_name_id=1, function_name_id=1, line=172)
  idx.file_locations.add(file_name_id=2, function_name_id=2, line=422)
  idx.stack_frames.add(file_location_id=1, parent_frame_id=0)
  idx.stack_frames.add(file_location_id=2, parent_frame_id=1)
  entry = m.computations.add(name='main', id=1)
  fusion = entry.instructions.add(name='fusion.1', opcode='fusion', id=1)
  fusion.called_computation_ids.append(2)
  fusion.metadata.stack_frame_id = 1
  dot = entry.instructions.add(name='dot.2', opcode='dot', id=2)
  dot.metadata.stack_frame_id = 2
  entry.instructions.add(name='copy.3', opcode='copy', id=3)
  fused = m.computations.add(name='fused', id=2)
  fused.instructions.add(name='scatter.0', opcode='scatter', id=4)
  return proto.SerializeToString()


def _space():
  space = xplane_pb2.XSpace()
  meta = space.planes.add(id=1, name='/host:metadata')
  meta.stat_metadata[1].id, meta.stat_metadata[1].name = 1, 'Hlo Proto'
  meta.event_metadata[1].id, meta.event_metadata[1].name = 1, 'jit_train_step(7)'
  meta.event_metadata[1].stats.add(metadata_id=1, bytes_value=_hlo_module())
  return space


def _event(plane, line, name, start, dur, **stats):
  ids = {v.name: k for k, v in plane.event_metadata.items()}
  if name not in ids:
    ids[name] = len(ids) + 1
    plane.event_metadata[ids[name]].id, plane.event_metadata[ids[name]].name = ids[name], name
  ev = line.events.add(metadata_id=ids[name], offset_ps=start, duration_ps=dur)
  snames = {v.name: k for k, v in plane.stat_metadata.items()}
  for key, value in stats.items():
    if key not in snames:
      snames[key] = len(snames) + 1
      plane.stat_metadata[snames[key]].id = snames[key]
      plane.stat_metadata[snames[key]].name = key
    ev.stats.add(metadata_id=snames[key], str_value=value)


def _write(space, tmp_path):
  run = tmp_path / 'plugins' / 'profile' / 'run1'
  run.mkdir(parents=True)
  (run / 'host.xplane.pb').write_bytes(space.SerializeToString())
  return str(tmp_path)


def _check(summary):
  assert summary.total_ps == 700
  assert summary.by_source == [('mdt_jax/models/layers.py:172 Attention.__call__', 600),
                               ('(no source)', 100)]
  assert dict(summary.by_opcode) == {'fusion[scatter]': 500, 'dot': 100, 'copy': 100}
  assert summary.by_op[0] == ('jit_train_step:fusion.1', 'fusion[scatter]', 2, 500)


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
  space = _space()
  gpu = space.planes.add(id=2, name='/device:GPU:0')
  stream, derived = gpu.lines.add(id=1, name='Stream #14(Compute)'), gpu.lines.add(id=2,
                                                                                   name='XLA Ops')
  mod = 'jit_train_step'
  _event(gpu, stream, 'loop_scatter_kernel', 0, 300, hlo_op='fusion.1', hlo_module=mod)
  _event(gpu, stream, 'sm90_gemm', 400, 100, hlo_op='dot.2', hlo_module=mod)
  _event(gpu, stream, 'loop_scatter_kernel', 600, 200, hlo_op='fusion.1', hlo_module=mod)
  _event(gpu, stream, 'copy_kernel', 900, 100, hlo_op='copy.3', program_id='7')  # id only
  _event(gpu, stream, 'other', 1000, 50, hlo_op='add.9', hlo_module='jit_other')
  for start, dur in ((0, 300), (400, 100), (600, 200)):    # the derived line repeats the ops
    _event(gpu, derived, 'fusion.1', start, dur, hlo_op='fusion.1', hlo_module=mod)
  summary = profile_summary.summarize(_write(space, tmp_path), 'train_step')
  _check(summary)
  assert summary.planes == ['/device:GPU:0']
  everything = profile_summary.summarize(str(tmp_path))
  assert everything.total_ps == 750 and ('jit_other:add.9', '?', 1, 50) in everything.by_op


def test_tpu_trace_takes_ops_and_modules_from_the_derived_lines(tmp_path):
  space = _space()
  tpu = space.planes.add(id=2, name='/device:TPU:0')
  modules, ops = tpu.lines.add(id=1, name='XLA Modules'), tpu.lines.add(id=2, name='XLA Ops')
  _event(tpu, modules, 'jit_train_step(7)', 0, 1000)
  _event(tpu, modules, 'jit_other(3)', 2000, 100)
  _event(tpu, ops, 'fusion.1', 0, 300)
  _event(tpu, ops, 'dot.2', 300, 100)
  _event(tpu, ops, 'fusion.1', 500, 200)
  _event(tpu, ops, 'copy.3', 800, 100)
  _event(tpu, ops, 'add.9', 2000, 100)
  _check(profile_summary.summarize(_write(space, tmp_path), 'train_step'))


def test_a_trace_without_the_module_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match="no executed XLA ops of modules matching 'sampler'"):
    profile_summary.summarize(_write(_space(), tmp_path), 'sampler')


DATA = os.path.join(os.path.dirname(__file__), 'data')


@pytest.fixture(scope='module')
def micro_trace(tmp_path_factory):
  """A CPU trace of one train step of tests/micro_config.py at depth 1, batch 4
  (`benchmark.bench_train_step(config, mask_branch=True, steps=1, repeats=1, warmup=1,
  trace_dir=...)`), and what the summary of commit c769865 (the hand-written protobuf decoder,
  mdt_jax/trace_proto.py) made of it: the summary, its Markdown, and each executed op's opcode
  and source line."""
  run = tmp_path_factory.mktemp('trace') / 'plugins' / 'profile' / 'run1'
  run.mkdir(parents=True)
  with gzip.open(os.path.join(DATA, 'profile_micro.xplane.pb.gz')) as f:
    (run / 'vm.xplane.pb').write_bytes(f.read())
  with gzip.open(os.path.join(DATA, 'profile_micro_summary.json.gz')) as f:
    expected = json.load(f)
  return str(run.parent.parent.parent), expected


def test_a_real_trace_reads_as_before(micro_trace):
  path, expected = micro_trace
  summary = profile_summary.summarize(path, 'train_step')
  assert summary.to_json() == expected['train_step']
  assert summary.markdown(12) == expected['markdown_top12']
  assert sum(t for _, t in summary.by_source) == summary.total_ps
