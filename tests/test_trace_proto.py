"""mdt_jax.trace_proto reads what TensorFlow's generated protobuf classes write."""
import pytest
from tensorflow.compiler.xla.service import hlo_pb2
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from mdt_jax import trace_proto


def _space() -> bytes:
  space = xplane_pb2.XSpace()
  plane = space.planes.add(id=-3, name='/device:GPU:0')
  plane.stat_metadata[7].id, plane.stat_metadata[7].name = 7, 'hlo_op'
  plane.event_metadata[1 << 40].name = 'big key'
  meta = plane.event_metadata[2]
  meta.id, meta.name = 2, 'fusion.1'
  meta.stats.add(metadata_id=7, double_value=-2.5)
  meta.child_id.extend([3, 4])        # packed, not read: skipped as an unknown field
  line = plane.lines.add(id=5, name='Stream #1', timestamp_ns=123)
  ev = line.events.add(metadata_id=2, offset_ps=10, duration_ps=1 << 50)
  ev.stats.add(metadata_id=7, str_value='fusion.1 ü')
  ev.stats.add(metadata_id=8, int64_value=-9)
  ev.stats.add(metadata_id=9, uint64_value=(1 << 64) - 1)
  ev.stats.add(metadata_id=10, bytes_value=b'\x00\xff')
  ev.stats.add(metadata_id=11, ref_value=7)
  ev.stats.add(metadata_id=12)                                   # no value set
  space.planes.add(name='/host:CPU')
  return space.SerializeToString()


def test_xspace_fields_read_as_tensorflow_writes_them():
  space = trace_proto.XSpace(_space())
  gpu, cpu = space.planes
  assert (gpu.id, gpu.name, cpu.name, cpu.lines) == (-3, '/device:GPU:0', '/host:CPU', [])
  assert {k: v.name for k, v in gpu.stat_metadata.items()} == {7: 'hlo_op'}
  assert gpu.event_metadata[1 << 40].name == 'big key'
  meta = gpu.event_metadata[2]
  assert (meta.id, meta.name, meta.stats[0].double_value) == (2, 'fusion.1', -2.5)
  (line,) = gpu.lines
  assert (line.id, line.name) == (5, 'Stream #1')
  (ev,) = line.events
  assert (ev.metadata_id, ev.offset_ps, ev.duration_ps) == (2, 10, 1 << 50)
  got = [(s.metadata_id, s.which(), getattr(s, s.which()) if s.which() else None)
         for s in ev.stats]
  assert got == [(7, 'str_value', 'fusion.1 ü'), (8, 'int64_value', -9),
                 (9, 'uint64_value', (1 << 64) - 1), (10, 'bytes_value', b'\x00\xff'),
                 (11, 'ref_value', 7), (12, None, None)]
  assert meta.stats[0].which() == 'double_value'


def test_hlo_fields_and_packed_repeated_ids():
  proto = hlo_pb2.HloProto()
  m = proto.hlo_module
  m.name = 'jit_step'
  m.stack_frame_index.file_names.extend(['a.py', 'b.py'])
  m.stack_frame_index.file_locations.add(file_name_id=2, function_name_id=1, line=172)
  m.stack_frame_index.stack_frames.add(file_location_id=1, parent_frame_id=0)
  comp = m.computations.add(name='main', id=9)
  ins = comp.instructions.add(name='fusion.3', opcode='fusion', id=300)
  ins.called_computation_ids.extend([10, 11, 1 << 33])
  ins.metadata.stack_frame_id = 1
  ins.metadata.source_line = 5
  module = trace_proto.HloProto(proto.SerializeToString()).hlo_module
  assert module.name == 'jit_step'
  idx = module.stack_frame_index
  assert idx.file_names == ['a.py', 'b.py'] and idx.function_names == []
  loc = idx.file_locations[0]
  assert (loc.file_name_id, loc.function_name_id, loc.line) == (2, 1, 172)
  assert (idx.stack_frames[0].file_location_id, idx.stack_frames[0].parent_frame_id) == (1, 0)
  (c,) = module.computations
  (i,) = c.instructions
  assert (c.id, c.name, i.name, i.opcode, i.id) == (9, 'main', 'fusion.3', 'fusion', 300)
  assert i.called_computation_ids == [10, 11, 1 << 33]
  assert (i.metadata.stack_frame_id, i.metadata.source_line, i.metadata.op_name) == (1, 5, '')
  empty = trace_proto.HloInstructionProto(b'')
  assert (empty.name, empty.metadata.stack_frame_id, empty.called_computation_ids) == ('', 0, [])


@pytest.mark.parametrize('data, match', [
    (_space()[:1], 'truncated protobuf varint'),
    (_space()[:-1], 'truncated protobuf field'),
    (b'\x0f\x00\x00', 'wire type 7 .field 1. at byte 1 is not one a trace uses'),
])
def test_cut_off_or_foreign_bytes_are_refused(data, match):
  with pytest.raises(ValueError, match=match):
    trace_proto.XSpace(data)
