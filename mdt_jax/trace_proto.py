"""The few protobuf messages of a `jax.profiler` trace that profile_summary reads, without
TensorFlow or generated classes: protocol buffers' wire format read by field number.

Field numbers are those of tsl/profiler/protobuf/xplane.proto (XSpace and its parts) and of
xla/hlo.proto (the HLO module a trace stores for each program). A message decodes its fields on
first access; unknown fields are skipped, as protobuf readers do.
"""
from __future__ import annotations

import struct

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if i >= len(buf):
      raise ValueError('truncated protobuf varint: the file is cut off or not a trace')
    b = buf[i]
    i += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, i
    shift += 7


def read_fields(buf) -> dict[int, list]:
  """Field number -> its raw values in order: int (varint), memoryview (length-delimited) or
  bytes (fixed 32/64-bit)."""
  buf = memoryview(buf)
  out: dict[int, list] = {}
  i, n = 0, len(buf)
  while i < n:
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, i = _varint(buf, i)
    elif wire == _LEN:
      size, i = _varint(buf, i)
      value, i = buf[i:i + size], i + size
    elif wire == _I64:
      value, i = bytes(buf[i:i + 8]), i + 8
    elif wire == _I32:
      value, i = bytes(buf[i:i + 4]), i + 4
    else:
      raise ValueError(f'protobuf wire type {wire} (field {number}) at byte {i} is not one a '
                       'trace uses: the file is not an XSpace / HloProto')
    if i > n:
      raise ValueError('truncated protobuf field: the file is cut off or not a trace')
    out.setdefault(number, []).append(value)
  return out


def _signed64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _ints(raw: list, signed: bool) -> list[int]:
  """Repeated integers, packed (one length-delimited run of varints) or not."""
  out = []
  for v in raw:
    if isinstance(v, memoryview):
      i = 0
      while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    else:
      out.append(v)
  return [_signed64(x) for x in out] if signed else out


class Message:
  """Base of the messages below: FIELDS maps attribute -> (number, kind, repeated), where kind
  is 'int' (int32/int64), 'uint', 'double', 'str', 'bytes', a Message class, or ('map', class)
  for a map<int64, class> (read as a dict)."""
  FIELDS: dict = {}

  def __init__(self, buf=b''):
    self._raw = read_fields(buf)

  def __getattr__(self, name: str):
    if name.startswith('_') or name not in self.FIELDS:
      raise AttributeError(f'{type(self).__name__} has no field {name!r}')
    number, kind, repeated = self.FIELDS[name]
    raw = self._raw.get(number, [])
    if kind in ('int', 'uint'):
      values = _ints(raw, kind == 'int')
    elif kind == 'double':
      values = [struct.unpack('<d', v)[0] for v in raw]
    elif kind == 'str':
      values = [bytes(v).decode('utf-8', 'replace') for v in raw]
    elif kind == 'bytes':
      values = [bytes(v) for v in raw]
    elif isinstance(kind, tuple):
      entries = [read_fields(v) for v in raw]
      value = {_signed64(e.get(1, [0])[-1]): kind[1](e.get(2, [b''])[-1]) for e in entries}
      setattr(self, name, value)
      return value
    else:
      values = [kind(v) for v in raw]
    if repeated:
      value = values
    elif values:
      value = values[-1]                   # the last occurrence wins, as in protobuf
    else:
      value = {'int': 0, 'uint': 0, 'double': 0.0, 'str': '', 'bytes': b''}.get(kind) \
          if not isinstance(kind, type) else kind()
    setattr(self, name, value)           # decoded once
    return value


# ------------------------------------------------------------------ xplane.proto

class XStat(Message):
  FIELDS = {'metadata_id': (1, 'int', False), 'double_value': (2, 'double', False),
            'uint64_value': (3, 'uint', False), 'int64_value': (4, 'int', False),
            'str_value': (5, 'str', False), 'bytes_value': (6, 'bytes', False),
            'ref_value': (7, 'uint', False)}
  VALUES = ('double_value', 'uint64_value', 'int64_value', 'str_value', 'bytes_value',
            'ref_value')

  def which(self) -> str | None:
    """The field of the `value` oneof that is set (the last one written), or None."""
    numbers = {self.FIELDS[k][0]: k for k in self.VALUES}
    present = [numbers[n] for n in self._raw if n in numbers]
    return present[-1] if present else None


class XStatMetadata(Message):
  FIELDS = {'id': (1, 'int', False), 'name': (2, 'str', False)}


class XEventMetadata(Message):
  FIELDS = {'id': (1, 'int', False), 'name': (2, 'str', False), 'stats': (5, XStat, True)}


class XEvent(Message):
  FIELDS = {'metadata_id': (1, 'int', False), 'offset_ps': (2, 'int', False),
            'duration_ps': (3, 'int', False), 'stats': (4, XStat, True)}


class XLine(Message):
  FIELDS = {'id': (1, 'int', False), 'name': (2, 'str', False), 'events': (4, XEvent, True)}


class XPlane(Message):
  FIELDS = {'id': (1, 'int', False), 'name': (2, 'str', False), 'lines': (3, XLine, True),
            'event_metadata': (4, ('map', XEventMetadata), False),
            'stat_metadata': (5, ('map', XStatMetadata), False)}


class XSpace(Message):
  FIELDS = {'planes': (1, XPlane, True)}


# ------------------------------------------------------------------ hlo.proto

class OpMetadata(Message):
  FIELDS = {'op_name': (2, 'str', False), 'source_file': (3, 'str', False),
            'source_line': (4, 'int', False), 'stack_frame_id': (15, 'int', False)}


class HloInstructionProto(Message):
  FIELDS = {'name': (1, 'str', False), 'opcode': (2, 'str', False),
            'metadata': (7, OpMetadata, False), 'id': (35, 'int', False),
            'called_computation_ids': (38, 'int', True)}


class HloComputationProto(Message):
  FIELDS = {'name': (1, 'str', False), 'instructions': (2, HloInstructionProto, True),
            'id': (5, 'int', False)}


class FileLocation(Message):
  FIELDS = {'file_name_id': (1, 'int', False), 'function_name_id': (2, 'int', False),
            'line': (3, 'int', False)}


class StackFrame(Message):
  FIELDS = {'file_location_id': (1, 'int', False), 'parent_frame_id': (2, 'int', False)}


class StackFrameIndexProto(Message):
  FIELDS = {'file_names': (1, 'str', True), 'function_names': (2, 'str', True),
            'file_locations': (3, FileLocation, True), 'stack_frames': (4, StackFrame, True)}


class HloModuleProto(Message):
  FIELDS = {'name': (1, 'str', False), 'computations': (3, HloComputationProto, True),
            'stack_frame_index': (17, StackFrameIndexProto, False)}


class HloProto(Message):
  FIELDS = {'hlo_module': (1, HloModuleProto, False)}
