"""tools/profile_summary.py's reading of traces (tools/benchmarks/profile.py): a real CPU trace reads
as the hand-written decoder it replaced read it; GPU- and TPU-shaped traces are built here as
text protos (jax.profiler's own converter), holding the real trace's HLO module."""

import gzip
import json
import os

import pytest
from jax.profiler import ProfileData

from benchmarks import profile

DATA = os.path.join(os.path.dirname(__file__), 'data')


@pytest.fixture(scope='module')
def micro_trace(tmp_path_factory):
  """A CPU trace of one train step of tests/micro_config.py at depth 1, batch 4
  (`timing.bench_train_step(config, mask_branch=True, steps=1, repeats=1, warmup=1,
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
  summary = profile.summarize(path, 'train_step')
  assert summary.to_json() == expected['train_step']
  assert summary.markdown(12) == expected['markdown_top12']
  assert sum(t for _, t in summary.by_source) == summary.total_ps
  info = profile.hlo_op_info(profile.hlo_modules(profile.find_trace(path)))
  got = {f'{m}:{op}': [i.opcode, i.source] for (m, op), i in info.items()}
  assert {k: got.get(k) for k in expected['executed_ops']} == expected['executed_ops']
  assert os.listdir(os.path.dirname(profile.find_trace(path))) == ['vm.xplane.pb']  # untouched


# ------------------------------------------------------------ GPU- and TPU-shaped traces

# Three ops of the real module: a fusion holding a scatter, a dot and a copy without a stack.
FUSION, DOT, COPY = 'wrapped_scatter', 'dot.10', 'copy.242'


def _escape(data: bytes) -> str:
  return ''.join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f'\\{b:03o}' for b in data)


class _Plane:
  """One device plane of a text-proto XSpace: lines of events with string stats, stamped with
  an absolute clock as device tracers stamp them (starts then read to 256 ns)."""

  CLOCK_NS = 1_796_142_957_489_532_123

  def __init__(self, name):
    self.name, self.lines, self.events, self.stats = name, {}, {}, {}

  def event(self, line, name, start, dur, **stats):
    """An event from `start` for `dur` nanoseconds (ProfileData reads whole nanoseconds)."""
    start, dur = start * 1000, dur * 1000
    mid = self.events.setdefault(name, len(self.events) + 1)
    body = ''.join(
        f' stats {{ metadata_id: {self.stats.setdefault(k, len(self.stats) + 1)} '
        f'str_value: "{v}" }}'
        for k, v in stats.items()
    )
    self.lines.setdefault(line, []).append(
        f'events {{ metadata_id: {mid} offset_ps: {start} duration_ps: {dur}{body} }}'
    )

  def text(self, pid):
    lines = ''.join(
        f' lines {{ id: {i} name: "{n}" timestamp_ns: {self.CLOCK_NS} {" ".join(evs)} }}'
        for i, (n, evs) in enumerate(self.lines.items(), 1)
    )
    meta = ''.join(
        f' event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
        for n, i in self.events.items()
    )
    stats = ''.join(
        f' stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
        for n, i in self.stats.items()
    )
    return f'planes {{ id: {pid} name: "{self.name}"{lines}{meta}{stats} }}'


@pytest.fixture(scope='module')
def hlo_metadata(micro_trace):
  """The /host:metadata plane of a trace holding the real train step's module, program id 7."""
  protos = profile.hlo_protos(profile.find_trace(micro_trace[0]))
  (name,) = [n for n in protos if n.startswith('jit_train_step(')]
  return (
      'planes { id: 1 name: "/host:metadata" '
      'stat_metadata { key: 1 value { id: 1 name: "Hlo Proto" } } '
      'event_metadata { key: 1 value { id: 1 name: "jit_train_step(7)" '
      f'stats {{ metadata_id: 1 bytes_value: "{_escape(protos[name])}" }} }} }} }}'
  )


def _write(hlo_metadata, plane, tmp_path):
  run = tmp_path / 'plugins' / 'profile' / 'run1'
  run.mkdir(parents=True)
  text = hlo_metadata + ' ' + plane.text(2)
  (run / 'host.xplane.pb').write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
  return str(tmp_path)


def _check(summary, micro_trace):
  ops = micro_trace[1]['executed_ops']
  (fusion_op, fusion_src), (dot_op, dot_src), (copy_op, copy_src) = (
      ops[f'jit_train_step:{n}'] for n in (FUSION, DOT, COPY)
  )
  assert (fusion_op, dot_op, copy_op) == ('fusion[scatter]', 'dot', 'copy')
  ns = 1000
  assert summary.total_ps == 700 * ns
  assert dict(summary.by_source) == {fusion_src: 500 * ns, dot_src: 100 * ns, copy_src: 100 * ns}
  assert dict(summary.by_opcode) == {'fusion[scatter]': 500 * ns, 'dot': 100 * ns, 'copy': 100 * ns}
  assert summary.by_op[0] == (f'jit_train_step:{FUSION}', 'fusion[scatter]', 2, 500 * ns)


def test_gpu_trace_counts_stream_kernels_once(hlo_metadata, micro_trace, tmp_path):
  gpu, mod = _Plane('/device:GPU:0'), 'jit_train_step'
  stream = 'Stream #14(Compute)'
  gpu.event(stream, 'loop_scatter_kernel', 0, 300, hlo_op=FUSION, hlo_module=mod)
  gpu.event(stream, 'sm90_gemm', 400, 100, hlo_op=DOT, hlo_module=mod)
  gpu.event(stream, 'loop_scatter_kernel', 600, 200, hlo_op=FUSION, hlo_module=mod)
  gpu.event(stream, 'copy_kernel', 900, 100, hlo_op=COPY, program_id='7')  # the id only
  gpu.event(stream, 'other', 1000, 50, hlo_op='add.9', hlo_module='jit_other')
  for start, dur in ((0, 300), (400, 100), (600, 200)):  # the derived line repeats the ops
    gpu.event('XLA Ops', FUSION, start, dur, hlo_op=FUSION, hlo_module=mod)
  path = _write(hlo_metadata, gpu, tmp_path)
  summary = profile.summarize(path, 'train_step')
  _check(summary, micro_trace)
  assert summary.planes == ['/device:GPU:0']
  everything = profile.summarize(path)
  assert everything.total_ps == 750_000 and ('jit_other:add.9', '?', 1, 50_000) in everything.by_op


def test_tpu_trace_takes_ops_and_modules_from_the_derived_lines(
    hlo_metadata, micro_trace, tmp_path
):
  tpu = _Plane('/device:TPU:0')
  tpu.event('XLA Modules', 'jit_train_step(7)', 0, 1000)
  tpu.event('XLA Modules', 'jit_other(3)', 2000, 100)
  for name, start, dur in (
      (FUSION, 0, 300),
      (DOT, 300, 100),
      (FUSION, 500, 200),
      (COPY, 800, 100),
      ('add.9', 2000, 100),
  ):
    tpu.event('XLA Ops', name, start, dur)
  _check(profile.summarize(_write(hlo_metadata, tpu, tmp_path), 'train_step'), micro_trace)


def test_a_trace_without_the_module_is_refused_by_name(micro_trace):
  with pytest.raises(ValueError, match="no executed XLA ops of modules matching 'sampler'"):
    profile.summarize(micro_trace[0], 'sampler')
