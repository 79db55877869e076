"""Where the time goes in a `jax.profiler` trace, without TensorBoard (tools/profile_summary.py).

Reads the ``*.xplane.pb`` that ``--profile`` writes, takes every executed XLA op (GPU kernels on
the device planes' stream lines, TPU ops on the 'XLA Ops' line; on the CPU backend, the thunks on
the host threads) and adds up each op's *self* time (time not spent in ops nested inside it,
e.g. a while loop's body). Each op is tied, through the HLO module stored in the trace, to the
line of this project's code that emitted it (the innermost stack frame under ``mdt_jax/``), so
the result reads as "20% in layers.py:172 Attention.__call__".

The trace's protobufs are read by `mdt_jax.trace_proto` (no TensorFlow needed).
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import os
import re

from mdt_jax import trace_proto
from mdt_jax.models.platform import DISPATCH_SOURCE

OWN_CODE = os.sep + 'mdt_jax' + os.sep
DEVICE_PLANE = re.compile(r'^/device:(GPU|TPU)')


@dataclasses.dataclass
class OpInfo:
  opcode: str = '?'
  source: str = '(no source)'


@dataclasses.dataclass
class Summary:
  total_ps: int
  by_op: list[tuple[str, str, int, int]]            # (module:op, opcode, count, self ps)
  by_source: list[tuple[str, int]]                  # (file:line function, self ps)
  by_opcode: list[tuple[str, int]]
  planes: list[str]

  def markdown(self, top: int = 20) -> str:
    pct = lambda ps: f'{100.0 * ps / max(self.total_ps, 1):.1f}%'
    ms = lambda ps: f'{ps / 1e9:.2f}'
    out = [f'Op time in the trace: {ms(self.total_ps)} ms (planes: {", ".join(self.planes)})', '',
           '| source line (innermost mdt_jax frame) | self ms | share |', '|---|---|---|']
    out += [f'| {s} | {ms(t)} | {pct(t)} |' for s, t in self.by_source[:top]]
    out += ['', '| opcode | self ms | share |', '|---|---|---|']
    out += [f'| {o} | {ms(t)} | {pct(t)} |' for o, t in self.by_opcode[:top]]
    out += ['', '| XLA op | opcode | count | self ms | share |', '|---|---|---|---|---|']
    out += [f'| {n} | {o} | {c} | {ms(t)} | {pct(t)} |' for n, o, c, t in self.by_op[:top]]
    return '\n'.join(out)

  def to_json(self) -> dict:
    return {'total_ms': self.total_ps / 1e9, 'planes': self.planes,
            'by_source': [{'source': s, 'ms': t / 1e9} for s, t in self.by_source],
            'by_opcode': [{'opcode': o, 'ms': t / 1e9} for o, t in self.by_opcode],
            'by_op': [{'op': n, 'opcode': o, 'count': c, 'ms': t / 1e9}
                      for n, o, c, t in self.by_op]}


def find_trace(path: str) -> str:
  """The newest ``*.xplane.pb`` under `path` (a file is returned as is)."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, '**', '*.xplane.pb'), recursive=True)
  if not found:
    raise FileNotFoundError(f'no *.xplane.pb under {path!r}: expected the folder given to '
                            '--profile (it holds plugins/profile/<run>/<host>.xplane.pb)')
  return max(found, key=os.path.getmtime)


def _stat_value(stat, names):
  kind = stat.which()
  if kind == 'ref_value':
    return names.get(stat.ref_value)
  return getattr(stat, kind) if kind else None


def _source(module, frame_id: int) -> str:
  """The innermost frame of this project's code on the stack `frame_id` (1-based)."""
  idx = module.stack_frame_index
  while frame_id:
    frame = idx.stack_frames[frame_id - 1]
    loc = idx.file_locations[frame.file_location_id - 1]
    fname = idx.file_names[loc.file_name_id - 1]
    if OWN_CODE in fname and not fname.endswith(DISPATCH_SOURCE):
      short = fname[fname.rindex(OWN_CODE) + 1:]
      return f'{short}:{loc.line} {idx.function_names[loc.function_name_id - 1]}'
    frame_id = frame.parent_frame_id
  return '(outside mdt_jax)'


def hlo_op_info(space) -> dict[tuple[str, str], OpInfo]:
  """(module name, instruction name) -> opcode and source line, from the HLO in the trace."""
  info = {}
  for plane in space.planes:
    if plane.name != '/host:metadata':
      continue
    names = {k: v.name for k, v in plane.stat_metadata.items()}
    for meta in plane.event_metadata.values():
      for stat in meta.stats:
        if names.get(stat.metadata_id) != 'Hlo Proto':
          continue
        module = trace_proto.HloProto(stat.bytes_value).hlo_module
        comps = {c.id: c for c in module.computations}
        for comp in module.computations:
          for ins in comp.instructions:
            src = (_source(module, ins.metadata.stack_frame_id)
                   if ins.metadata.stack_frame_id else '(no source)')
            info[(module.name, ins.name)] = OpInfo(_category(ins, comps), src)
  return info


NOTABLE = ('dot', 'convolution', 'custom-call', 'scatter', 'gather', 'reduce', 'sort',
           'dynamic-update-slice', 'dynamic-slice')


def _category(ins, comps) -> str:
  """The opcode; for a fusion, the notable ops fused in it, e.g. 'fusion[dot]'."""
  if ins.opcode != 'fusion':
    return ins.opcode
  inner, todo = set(), list(ins.called_computation_ids)
  while todo:
    comp = comps.get(todo.pop())
    if comp is None:
      continue
    for sub in comp.instructions:
      if sub.opcode in NOTABLE:
        inner.add(sub.opcode)
      todo.extend(sub.called_computation_ids)
  return f'fusion[{",".join(sorted(inner))}]' if inner else 'fusion[elementwise]'


def _module_name(name: str) -> str:
  """'jit_train_step(22)' -> 'jit_train_step' (the XLA Modules line appends the program id)."""
  return re.sub(r'\(\d+\)$', '', name)


def program_modules(space) -> dict[int, str]:
  """program id -> module name, from the metadata plane's 'jit_train_step(22)' entries."""
  out = {}
  for plane in space.planes:
    if plane.name == '/host:metadata':
      for meta in plane.event_metadata.values():
        m = re.fullmatch(r'(.*)\((\d+)\)', meta.name)
        if m:
          out[int(m.group(2))] = m.group(1)
  return out


def _line_events(plane, line, names, programs=None):
  """(start ps, duration ps, hlo_op or None, hlo_module or None, event name) of one line; the
  module comes from the program id where an event names no module."""
  out = []
  for e in line.events:
    meta = plane.event_metadata[e.metadata_id]
    stats = {names.get(s.metadata_id): _stat_value(s, names)
             for s in list(meta.stats) + list(e.stats)}
    op, module = stats.get('hlo_op'), stats.get('hlo_module')
    if module is None and programs and stats.get('program_id') is not None:
      module = programs.get(int(stats['program_id']))
    out.append((e.offset_ps, e.duration_ps, None if op is None else str(op),
                None if module is None else str(module), meta.name))
  return out


def _op_events(space):
  """Yield (plane name, [(start, duration, hlo_op, hlo_module)]) per timeline of executed ops.

  GPU: kernels on the 'Stream #...' lines carry hlo_op / hlo_module (the derived 'XLA Ops' line
  repeats them and is skipped). TPU (no streams): the 'XLA Ops' line, each op's module taken from
  the 'XLA Modules' event that contains it. CPU backend: thunks on the host threads.
  """
  programs = program_modules(space)
  for plane in space.planes:
    device = bool(DEVICE_PLANE.match(plane.name))
    if not device and plane.name != '/host:CPU':
      continue
    names = {k: v.name for k, v in plane.stat_metadata.items()}
    lines = {line.name: line for line in plane.lines}
    streams = [l for n, l in lines.items() if n.startswith('Stream')] if device else \
        list(plane.lines)
    found = False
    for line in streams:
      events = [(s, d, op, _module_name(mod or '?'))
                for s, d, op, mod, _ in _line_events(plane, line, names, programs)
                if op is not None]
      if events:
        found = True
        yield plane.name, events
    if device and not found and 'XLA Ops' in lines:
      modules = []
      if 'XLA Modules' in lines:
        modules = sorted((s, s + d, _module_name(n))
                         for s, d, _, _, n in _line_events(plane, lines['XLA Modules'], names))
      starts = [m[0] for m in modules]
      events = []
      for s, d, op, mod, name in _line_events(plane, lines['XLA Ops'], names, programs):
        if mod is None:
          i = bisect.bisect_right(starts, s) - 1
          mod = modules[i][2] if i >= 0 and s < modules[i][1] else '?'
        events.append((s, d, op or name, _module_name(mod)))
      if events:
        yield plane.name, events


def self_times(events) -> list[int]:
  """Self time of each (start, duration, ...) event of one timeline (nesting by containment)."""
  order = sorted(range(len(events)), key=lambda i: (events[i][0], -events[i][1]))
  own = [e[1] for e in events]
  stack: list[int] = []
  for i in order:
    start, dur = events[i][0], events[i][1]
    while stack and events[stack[-1]][0] + events[stack[-1]][1] <= start:
      stack.pop()
    if stack:
      own[stack[-1]] -= min(dur, events[stack[-1]][0] + events[stack[-1]][1] - start)
    stack.append(i)
  return [max(t, 0) for t in own]


def summarize(path: str, module_filter: str | None = None) -> Summary:
  """Aggregate the executed ops of the trace at `path` (only modules containing `module_filter`)."""
  trace = find_trace(path)
  with open(trace, 'rb') as f:
    space = trace_proto.XSpace(f.read())
  info = hlo_op_info(space)
  op_time, op_count = collections.Counter(), collections.Counter()
  opcode_of: dict[str, str] = {}
  by_source, by_opcode = collections.Counter(), collections.Counter()
  planes = []
  for plane, events in _op_events(space):
    for ev, t in zip(events, self_times(events)):
      _, _, op, module = ev
      if module_filter and module_filter not in module:
        continue
      meta = info.get((module, op), OpInfo())
      key = f'{module}:{op}'
      op_time[key] += t
      op_count[key] += 1
      opcode_of[key] = meta.opcode
      by_source[meta.source] += t
      by_opcode[meta.opcode] += t
      if plane not in planes:
        planes.append(plane)
  if not op_time:
    which = f' of modules matching {module_filter!r}' if module_filter else ''
    raise ValueError(f'no executed XLA ops{which} in {trace!r}: was the trace taken '
                     'while a jitted step ran?')
  return Summary(
      total_ps=sum(op_time.values()),
      by_op=[(k, opcode_of[k], op_count[k], t) for k, t in op_time.most_common()],
      by_source=by_source.most_common(), by_opcode=by_opcode.most_common(), planes=planes)
