"""Where the HBM bytes go: an optimized HLO module's traffic by source line and by op.

XLA's cost analysis gives one total (``bytes accessed``). To see which code moves the bytes, each
top-level instruction of the module (the entry computation and the bodies of loops, calls and
conditionals; not the insides of fusions, which run out of on-chip memory) is charged the
bytes of its operands and its result, and tied to the innermost line of this project's code in
its stack trace (the HLO text carries the stack frames). An operand that a fusion only slices
(every use inside it a slice or dynamic-slice of it) is charged the slices' bytes: a sharded
optimizer update reads its chip's share of an all-reduced gradient, not the whole. The sum
approximates the HBM traffic (it cannot see that a fusion updates a buffer in place, and counts
a loop's body once); `markdown` prints it beside XLA's total, so the coverage is visible.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Iterator

from benchmarks.hlo import _split_type, _top_level_elements, arrays, own_frame

# no data moves: views, bookkeeping and the second half of async pairs (charged at the start)
FREE = {
    'parameter',
    'constant',
    'get-tuple-element',
    'tuple',
    'bitcast',
    'after-all',
    'partition-id',
    'replica-id',
    'opt-barrier',
    'iota',
    'while',
    'call',
    'conditional',
}
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_OPCODE = re.compile(r'\s*([a-z][a-z0-9\-]*)\(')
_CALLED = re.compile(
    r'\b(body|condition|branch_computations|called_computations)=\{?([^,}]+'
    r'(?:,\s*%[\w.\-]+)*)\}?'
)
# every computation an instruction calls: fusions' bodies, reducers and comparators too
_CALLS = re.compile(
    r'\b(?:calls|to_apply|body|condition|branch_computations|called_computations)'
    r'=(\{[^}]*\}|%?[\w.\-]+)'
)


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  out: list[tuple[int, int]]  # (bytes, memory space) of each array it writes
  operands: list[str]
  frame: int | None
  op_name: str
  calls: str | None  # a fusion's computation (its insides carry the stack frames)
  root: bool
  called: list[str] = dataclasses.field(default_factory=list)  # every computation it calls
  index: int | None = None  # a parameter's number


@dataclasses.dataclass
class Module:
  """An HLO module's text, parsed: computations {name: [Instr]}, the entry computation's name,
  the top-level computations (entry, loop bodies, called branches) and the stack of a frame id."""

  comps: dict[str, list[Instr]]
  entry: str | None
  top: set[str]
  stack: Callable[[int | None], Iterator[tuple[str, int, str]]]


def _written(opcode: str, type_text: str) -> list[tuple[int, int]]:
  """The arrays an instruction writes. An async start's tuple also holds its source (an alias)
  and scalar contexts: a copy-start writes its first element, a collective's start its second
  (the results)."""
  if opcode.endswith('-start') and type_text.startswith('('):
    elements = _top_level_elements(type_text)
    pick = 0 if opcode == 'copy-start' else min(1, len(elements) - 1)
    return arrays(elements[pick])
  return arrays(type_text)


def _operands(rest: str) -> list[str]:
  """Names inside the opcode's parentheses."""
  depth, end = 0, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == '('
    depth -= ch == ')'
    if depth == 0 and ch == ')':
      end = i
      break
  return re.findall(r'%([\w.\-]+)', rest[:end])


def parse(text: str) -> Module:
  """The computations, instructions and stack frames of an HLO module's text (printed with its
  metadata, as ``compiled.as_text()`` is)."""
  comps: dict[str, list[Instr]] = {}
  entry, cur, top = None, None, set()
  frames, files, funcs, locs, section = {}, {}, {}, {}, None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
      continue
    if section and re.match(r'^\d+ ', line):
      key, val = line.split(' ', 1)
      key = int(key)
      if section == 'FileNames':
        files[key] = val.strip('"')
      elif section == 'FunctionNames':
        funcs[key] = val.strip('"')
      elif section == 'FileLocations':
        f = dict(re.findall(r'(\w+)=(\d+)', val))
        locs[key] = (int(f['file_name_id']), int(f['function_name_id']), int(f['line']))
      else:
        f = dict(re.findall(r'(\w+)=(\d+)', val))
        frames[key] = (int(f['file_location_id']), int(f['parent_frame_id']))
      continue
    h = _HEADER.match(line)
    if h and not line.startswith(' '):
      section, cur = None, h.group(2)
      comps[cur] = []
      if h.group(1):
        entry = cur
      continue
    m = _INSTR.match(line)
    if not m or cur is None:
      continue
    type_text, rest = _split_type(line[m.end() :])
    op = _OPCODE.match(rest)
    if not op:
      continue
    for kind, names in _CALLED.findall(rest):
      top.update(re.findall(r'%?([\w.\-]+)', names))
    sf = re.search(r'stack_frame_id=(\d+)', rest)
    on = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r'\bcalls=%([\w.\-]+)', rest)
    called = [n for group in _CALLS.findall(rest) for n in re.findall(r'%?([\w.\-]+)', group)]
    number = re.match(r'\s*parameter\((\d+)\)', rest) if op.group(1) == 'parameter' else None
    comps[cur].append(
        Instr(
            m.group(2),
            op.group(1),
            _written(op.group(1), type_text),
            _operands(rest[op.end() - 1 :]),
            int(sf.group(1)) if sf else None,
            on.group(1) if on else '',
            calls.group(1) if calls else None,
            bool(m.group(1)),
            called,
            int(number.group(1)) if number else None,
        )
    )
  top.add(entry)

  # This XLA prints each frame's parent one above its id (frame k's caller is k-1 when the
  # text says k; the outermost frames say their own id). Detected, not assumed.
  shift = 1 if any(parent == k for k, (_, parent) in frames.items()) else 0

  def stack(frame: int | None) -> Iterator[tuple[str, int, str]]:
    """(file, line, function) of the frame and its callers, innermost first."""
    seen = set()
    while frame and frame not in seen and frame in frames:
      seen.add(frame)
      loc, parent = frames[frame]
      fid, fn, line = locs[loc]
      yield files.get(fid, '?'), line, funcs.get(fn, '?')
      frame = parent - shift

  return Module(comps, entry, top, stack)


def source_of(module: Module) -> Callable[[Instr], str]:
  """Instr -> the innermost line of this project's code that emitted it (hlo.own_frame): its
  own stack, else its fusion's root's, else any inside the fusion."""
  comps = module.comps

  def frame_of(i: Instr, depth: int = 0) -> int | None:
    """The instruction's stack frame, else its fusion's root's, else any inside the fusion."""
    if i.frame is not None or not i.calls or depth > 4:
      return i.frame
    inner = sorted(comps.get(i.calls, []), key=lambda x: not x.root)
    for j in inner:
      f = frame_of(j, depth + 1)
      if f is not None:
        return f
    return None

  return lambda i: own_frame(module.stack(frame_of(i))) or '(no mdt_jax source)'


_SLICES = ('slice', 'dynamic-slice')


def _sliced_operands(comp: list[Instr]) -> dict[int, list[tuple[int, int]]]:
  """{operand number: arrays read} for a fused computation's parameters that it only slices."""
  users: dict[str, list[Instr]] = collections.defaultdict(list)
  for j in comp:
    for o in j.operands:
      users[o].append(j)
  out = {}
  for p in comp:
    uses = users.get(p.name, [])
    if p.opcode == 'parameter' and uses:
      if all(u.opcode in _SLICES and u.operands[:1] == [p.name] for u in uses):
        space = p.out[0][1] if p.out else 0
        out[p.index] = [(b, space) for u in uses for b, _ in u.out]
  return out


def traffic(text: str) -> list[dict]:
  """One row per top-level instruction that moves data: bytes read and written in any memory
  space ('bytes') and in HBM only ('hbm_bytes'), opcode, source line."""
  module = parse(text)
  source = source_of(module)
  rows = []
  for name in module.top:
    instrs = module.comps.get(name, [])
    out = {i.name: i.out for i in instrs}
    for i in instrs:
      if i.opcode in FREE or i.opcode.endswith('-done'):
        continue
      sliced = _sliced_operands(module.comps.get(i.calls, [])) if i.opcode == 'fusion' else {}
      read = [a for k, o in enumerate(i.operands) for a in sliced.get(k, out.get(o, []))]
      total = lambda xs: sum(b for b, _ in xs)  # noqa: E731
      hbm = lambda xs: sum(b for b, space in xs if space == 0)  # noqa: E731
      rows.append(
          {
              'instr': i.name,
              'opcode': i.opcode,
              'bytes': total(read) + total(i.out),
              'hbm_bytes': hbm(read) + hbm(i.out),
              'read': total(read),
              'written': total(i.out),
              'source': source(i),
              'op_name': i.op_name,
          }
      )
  return rows


def summarize(text: str, top: int = 25) -> dict:
  """{'total_gb', 'by_source': [(source, GB)], 'by_op': [(op, GB)]}, largest first; an op is
  named by its opcode, its (root) jax primitive and the pass (fwd, or bwd under transpose)."""
  rows = traffic(text)
  by_source, by_op = collections.Counter(), collections.Counter()
  for r in rows:
    by_source[r['source']] += r['bytes'] / 1e9
    last = r['op_name'].rsplit('/', 1)[-1] if r['op_name'] else r['opcode']
    phase = 'bwd' if 'transpose(' in r['op_name'] else 'fwd'
    by_op[f'{r["opcode"]}[{last}] {phase}'] += r['bytes'] / 1e9
  return {
      'total_gb': sum(r['bytes'] for r in rows) / 1e9,
      'hbm_gb': sum(r['hbm_bytes'] for r in rows) / 1e9,
      'by_source': by_source.most_common(top),
      'by_op': by_op.most_common(top),
  }


def markdown(summary: dict, xla_gb: float | None = None) -> str:
  """The summary as Markdown tables, shares of the top-level instructions' total."""
  total = summary['total_gb'] or 1.0
  head = (
      f'Traffic of the top-level instructions: {total:.2f} GB, {summary["hbm_gb"]:.2f} GB of '
      'it in HBM'
  )
  if xla_gb:
    head += f' (XLA bytes accessed: {xla_gb:.2f} GB)'
  out = [head, '', '| source line (innermost mdt_jax frame) | GB | share |', '|---|---|---|']
  out += [f'| {s} | {g:.2f} | {100 * g / total:.1f}% |' for s, g in summary['by_source']]
  out += ['', '| op (root op of a fusion), pass | GB | share |', '|---|---|---|']
  out += [f'| {k} | {g:.2f} | {100 * g / total:.1f}% |' for k, g in summary['by_op']]
  return '\n'.join(out)
