"""Where the time goes in a `jax.profiler` trace, without TensorBoard (tools/profile_summary.py).

Reads the ``*.xplane.pb`` that ``--profile`` writes, takes every executed XLA op (GPU kernels on
the device planes' stream lines, TPU ops on the 'XLA Ops' line; on the CPU backend, the thunks on
the host threads) and adds up each op's *self* time (time not spent in ops nested inside it,
e.g. a while loop's body). Each op is tied, through the HLO module stored in the trace, to the
line of this project's code that emitted it (the innermost stack frame under ``mdt_jax/``, past
the backend dispatch: `perf.hlo.own_frame`), so the result reads as "20% in layers.py:172
Attention.__call__".

The trace is read by the profiler's own libraries: the timelines by `jax.profiler.ProfileData`,
the HLO modules stored in it by xprof (which writes each as ``<module>(<program id>).hlo_proto.pb``
beside a link to the trace in a scratch folder), printed with their stack frames by XLA's HLO
printer (jaxlib) and parsed as `perf.traffic` parses ``compiled.as_text()``. ProfileData gives
durations in whole nanoseconds (the trace stores picoseconds; CPU and GPU tracers record whole
nanoseconds) and starts as float nanoseconds: exact on the CPU backend's host lines, to 256 ns
on lines stamped with absolute times, a slack allowed for when telling nested ops from
neighbours (`self_times`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import math
import os
import re
import tempfile

from google.protobuf import wrappers_pb2
from jax.profiler import ProfileData

from benchmarks import hlo, traffic
from mdt_jax.compat.jax import hlo_module_text

try:  # optional: tools/profile_summary.py and bench --profile need it (requirements-test.txt)
  from xprof.convert import raw_to_tool_data
except ImportError:  # pragma: no cover - reported when a summary is asked for
  raw_to_tool_data = None

DEVICE_PLANE = re.compile(r'^/device:(GPU|TPU)')
NOTABLE = (
    'dot',
    'convolution',
    'custom-call',
    'scatter',
    'gather',
    'reduce',
    'sort',
    'dynamic-update-slice',
    'dynamic-slice',
)


@dataclasses.dataclass
class Summary:
  total_ps: int
  by_op: list[tuple[str, str, int, int]]  # (module:op, opcode, count, self ps)
  by_source: list[tuple[str, int]]  # (file:line function, self ps)
  by_opcode: list[tuple[str, int]]
  planes: list[str]

  def markdown(self, top: int = 20) -> str:
    pct = lambda ps: f'{100.0 * ps / max(self.total_ps, 1):.1f}%'
    ms = lambda ps: f'{ps / 1e9:.2f}'
    out = [
        f'Op time in the trace: {ms(self.total_ps)} ms (planes: {", ".join(self.planes)})',
        '',
        '| source line (innermost mdt_jax frame) | self ms | share |',
        '|---|---|---|',
    ]
    out += [f'| {s} | {ms(t)} | {pct(t)} |' for s, t in self.by_source[:top]]
    out += ['', '| opcode | self ms | share |', '|---|---|---|']
    out += [f'| {o} | {ms(t)} | {pct(t)} |' for o, t in self.by_opcode[:top]]
    out += ['', '| XLA op | opcode | count | self ms | share |', '|---|---|---|---|---|']
    out += [f'| {n} | {o} | {c} | {ms(t)} | {pct(t)} |' for n, o, c, t in self.by_op[:top]]
    return '\n'.join(out)

  def to_json(self) -> dict:
    return {
        'total_ms': self.total_ps / 1e9,
        'planes': self.planes,
        'by_source': [{'source': s, 'ms': t / 1e9} for s, t in self.by_source],
        'by_opcode': [{'opcode': o, 'ms': t / 1e9} for o, t in self.by_opcode],
        'by_op': [{'op': n, 'opcode': o, 'count': c, 'ms': t / 1e9} for n, o, c, t in self.by_op],
    }


def find_trace(path: str) -> str:
  """The newest ``*.xplane.pb`` under `path` (a file is returned as is)."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, '**', '*.xplane.pb'), recursive=True)
  if not found:
    raise FileNotFoundError(
        f'no *.xplane.pb under {path!r}: expected the folder given to '
        '--profile (it holds plugins/profile/<run>/<host>.xplane.pb)'
    )
  return max(found, key=os.path.getmtime)


@dataclasses.dataclass
class OpInfo:
  opcode: str = '?'
  source: str = '(no source)'


def hlo_protos(trace: str) -> dict[str, bytes]:
  """'<module>(<program id>)' -> the serialized HloProto of every HLO module stored in the trace
  file `trace` (as xprof extracts them)."""
  if raw_to_tool_data is None:
    raise ImportError(
        'reading the HLO modules of a trace needs xprof: pip install xprof==2.24.2 '
        '(requirements-test.txt)'
    )
  out = {}
  with tempfile.TemporaryDirectory() as scratch:  # xprof writes beside the trace it reads
    link = os.path.join(scratch, os.path.basename(trace))
    os.symlink(os.path.abspath(trace), link)
    raw_to_tool_data.xspace_to_tool_names([link])
    for path in glob.glob(os.path.join(scratch, '*.hlo_proto.pb')):
      with open(path, 'rb') as f:
        out[os.path.basename(path)[: -len('.hlo_proto.pb')]] = f.read()
  return out


def hlo_text(hlo_proto: bytes) -> str | None:
  """An HloProto's module as text with its metadata and stack frames (XLA's HLO printer); None
  for a proto without a module."""
  # HloProto's field 1 is the HloModuleProto: read as BytesValue's field 1 (the same wire form)
  module = wrappers_pb2.BytesValue.FromString(hlo_proto).value
  if not module:
    return None
  return hlo_module_text(module)


def hlo_modules(trace: str) -> dict[str, str]:
  """'<module>(<program id>)' -> the module's HLO text (`hlo_text`), for every HLO module stored
  in the trace file `trace`."""
  texts = {name: hlo_text(proto) for name, proto in hlo_protos(trace).items()}
  return {name: text for name, text in texts.items() if text is not None}


def hlo_op_info(modules: dict[str, str]) -> dict[tuple[str, str], OpInfo]:
  """(module name, instruction name) -> opcode and source line, from `hlo_modules`' texts."""
  info = {}
  for name, text in modules.items():
    module = traffic.parse(text)
    for instrs in module.comps.values():
      for ins in instrs:
        src = '(no source)'
        if ins.frame:
          src = hlo.own_frame(module.stack(ins.frame))
          src = '(outside mdt_jax)' if src is None else 'mdt_jax/' + src
        info[(_module_name(name), ins.name)] = OpInfo(_category(ins, module.comps), src)
  return info


def _category(ins: traffic.Instr, comps: dict) -> str:
  """The opcode; for a fusion, the notable ops fused in it, e.g. 'fusion[dot]'."""
  if ins.opcode != 'fusion':
    return ins.opcode
  inner, todo, seen = set(), list(ins.called), set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for sub in comps.get(name, []):
      if sub.opcode in NOTABLE:
        inner.add(sub.opcode)
      todo.extend(sub.called)
  return f'fusion[{",".join(sorted(inner))}]' if inner else 'fusion[elementwise]'


def _module_name(name: str) -> str:
  """'jit_train_step(22)' -> 'jit_train_step' (traces append the program id)."""
  return re.sub(r'\(\d+\)$', '', name)


def program_modules(modules) -> dict[int, str]:
  """program id -> module name, from `hlo_protos`' 'jit_train_step(22)' keys."""
  out = {}
  for name in modules:
    m = re.fullmatch(r'(.*)\((\d+)\)', name)
    if m:
      out[int(m.group(2))] = m.group(1)
  return out


def _ps(ns: float) -> int:
  return round(ns * 1000)


def _slack(events) -> int:
  """The resolution of the events' starts in ps: ProfileData gives them as float nanoseconds,
  exact on lines timed from the trace's start (CPU), to 256 ns on absolute clocks."""
  return math.ceil(math.ulp(max((e[0] for e in events), default=0) / 1000) * 1000)


def _line_events(line, programs=None):
  """(start ps, duration ps, hlo_op or None, hlo_module or None, event name) of one line; the
  module comes from the program id where an event names no module."""
  out = []
  for e in line.events:
    stats = dict(e.stats)
    op, module = stats.get('hlo_op'), stats.get('hlo_module')
    if module is None and programs and stats.get('program_id') is not None:
      module = programs.get(int(stats['program_id']))
    out.append(
        (
            _ps(e.start_ns),
            _ps(e.duration_ns),
            None if op is None else str(op),
            None if module is None else str(module),
            e.name,
        )
    )
  return out


def _op_events(data: ProfileData, programs: dict[int, str]):
  """Yield (plane name, [(start, duration, hlo_op, hlo_module)]) per timeline of executed ops.

  GPU: kernels on the 'Stream #...' lines carry hlo_op / hlo_module (the derived 'XLA Ops' line
  repeats them and is skipped). TPU (no streams): the 'XLA Ops' line, each op's module taken from
  the 'XLA Modules' event that contains it. CPU backend: thunks on the host threads.
  """
  for plane in data.planes:
    device = bool(DEVICE_PLANE.match(plane.name))
    if not device and plane.name != '/host:CPU':
      continue
    lines = {line.name: line for line in plane.lines}
    streams = (
        [ln for n, ln in lines.items() if n.startswith('Stream')]
        if device
        else list(lines.values())
    )
    found = False
    for line in streams:
      events = [
          (s, d, op, _module_name(mod or '?'))
          for s, d, op, mod, _ in _line_events(line, programs)
          if op is not None
      ]
      if events:
        found = True
        yield plane.name, events
    if device and not found and 'XLA Ops' in lines:
      modules = []
      if 'XLA Modules' in lines:
        modules = sorted(
            (s, s + d, _module_name(n)) for s, d, _, _, n in _line_events(lines['XLA Modules'])
        )
      starts = [m[0] for m in modules]
      slack, events = _slack(modules), []
      for s, d, op, mod, name in _line_events(lines['XLA Ops'], programs):
        if mod is None:
          i = bisect.bisect_right(starts, s + slack) - 1
          mod = modules[i][2] if i >= 0 and s < modules[i][1] else '?'
        events.append((s, d, op or name, _module_name(mod)))
      if events:
        yield plane.name, events


def self_times(events, slack: int = 0) -> list[int]:
  """Self time of each (start, duration, ...) event of one timeline (nesting by containment).
  An event that ends within `slack` (the resolution of the starts) of the next one's start has
  ended: neighbours whose rounded starts overlap are not nested."""
  order = sorted(range(len(events)), key=lambda i: (events[i][0], -events[i][1]))
  own = [e[1] for e in events]
  stack: list[int] = []
  for i in order:
    start, dur = events[i][0], events[i][1]
    while stack and events[stack[-1]][0] + events[stack[-1]][1] <= start + slack:
      stack.pop()
    if stack:
      own[stack[-1]] -= min(dur, events[stack[-1]][0] + events[stack[-1]][1] - start)
    stack.append(i)
  return [max(t, 0) for t in own]


def summarize(path: str, module_filter: str | None = None) -> Summary:
  """Aggregate the executed ops of the trace at `path` (only modules containing `module_filter`)."""
  trace = find_trace(path)
  protos = hlo_protos(trace)
  timed = []  # (plane, module, op, self ps) of the kept ops
  for plane, events in _op_events(ProfileData.from_file(trace), program_modules(protos)):
    for (_, _, op, module), t in zip(events, self_times(events, _slack(events))):
      if not module_filter or module_filter in module:
        timed.append((plane, module, op, t))
  if not timed:
    which = f' of modules matching {module_filter!r}' if module_filter else ''
    raise ValueError(
        f'no executed XLA ops{which} in {trace!r}: was the trace taken while a jitted step ran?'
    )
  ran = {module for _, module, _, _ in timed}  # only these modules' HLO is read
  texts = {name: hlo_text(proto) for name, proto in protos.items() if _module_name(name) in ran}
  info = hlo_op_info({name: text for name, text in texts.items() if text is not None})
  op_time, op_count = collections.Counter(), collections.Counter()
  opcode_of: dict[str, str] = {}
  by_source, by_opcode = collections.Counter(), collections.Counter()
  planes = []
  for plane, module, op, t in timed:
    meta = info.get((module, op), OpInfo())
    key = f'{module}:{op}'
    op_time[key] += t
    op_count[key] += 1
    opcode_of[key] = meta.opcode
    by_source[meta.source] += t
    by_opcode[meta.opcode] += t
    if plane not in planes:
      planes.append(plane)
  return Summary(
      total_ps=sum(op_time.values()),
      by_op=[(k, opcode_of[k], op_count[k], t) for k, t in op_time.most_common()],
      by_source=by_source.most_common(),
      by_opcode=by_opcode.most_common(),
      planes=planes,
  )
