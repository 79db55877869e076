"""Kill anywhere, lose nothing; full disks and failed writes stop the run with one line.

Faults are injected by the file layer's hook (mdt_jax/faults.py, MDT_JAX_FAULT): a write of a
named site, by ordinal, is failed (ENOSPC, EIO) or the process is SIGKILLed there. One chain of
`python -m mdt_jax.main` runs on one workdir (tests/micro_config.py with sample grids every 2
steps and the digits evaluation at the last step, as the quickstart evaluates) is killed once at
each write site of a training run, in turn, and stopped once by a full disk; each start resumes
from what the one before left, and the finished run's state is bit-identical to the
uninterrupted run's (conftest's full_run: grids and evaluations do not change the training)."""

import hashlib
import http
import http.client
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import launch
import mdt_jax
from micro_config import get_config
from mdt_jax import atomic, errors, faults
from mdt_jax.training import evaluation
from mdt_jax.training.loop import train_and_evaluate

# Every write site and the case that injects a fault there. A site added to faults.SITES without
# a case here fails test_every_write_site_has_a_fault_case; a file a run writes without passing
# the hook fails test_every_file_of_the_run_passed_the_hook. The ordinals are those of a micro
# run (its writes in order: lock, config, events 1-3 (file header, hyperparameters, texts), the
# step-2 grid, the step-3 save (data position, then its 4 items' commits, asynchronous), ...).
KILLS = [  # (MDT_JAX_FAULT, the step the next start resumes from; None: it races, see below)
    ('lock@1:kill', 0),  # making the lock file, before it is linked into place
    ('config@1:kill', 0),  # config.json written, not yet renamed into place
    ('events@2:kill', 0),  # the event file, before the hyperparameters' record
    ('samples@1:kill', 0),  # the step-2 sample grid, written, not yet renamed into place
    ('data_position@1:kill', 0),  # inside the step-3 save: the data position
    ('checkpoint@2:kill', 0),  # inside the step-3 save's async commit (its second item)
    ('checkpoint@6:enospc', 3),  # a full disk in the step-6 save's commit: stops, status 2
    # the step-6 evaluation: eval.json written, the history not yet. The step-6 save is
    # committing meanwhile: the next start resumes from step 6 or 3, whichever it finds
    ('eval@2:kill', None),
]
FILE_LEVEL = {'file': 'samples.npz'}  # a site no training run writes (mdt_jax.sample's shards)
SITE_CASES = {spec.split('@')[0] for spec, _ in KILLS} | set(FILE_LEVEL)
CHAIN_FLAGS = (  # grids and the evaluation with 2 sampling steps: their writes, in seconds
    '--config.sample_every_steps=2',
    '--config.sampling.steps=2',
    '--config.eval_num_samples=32',
)


def _config():
  c = get_config()
  c.sample_every_steps, c.sampling.steps, c.eval_num_samples = 2, 2, 32
  return c


def _leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _evaluations(work: str) -> tuple[list[int], dict | None]:
  """(the steps of the workdir's evaluation history, its eval.json)."""
  history, final = os.path.join(work, evaluation.HISTORY_FILE), None
  steps = (
      [e['step'] for e in json.load(open(history))['evaluations']]
      if os.path.exists(history)
      else []
  )
  if os.path.exists(os.path.join(work, evaluation.FINAL_FILE)):
    final = json.load(open(os.path.join(work, evaluation.FINAL_FILE)))
  return steps, final


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """The runs of KILLS on one workdir, in turn: [(spec, the checkpoints it found, completed
  process, its evaluations after it)], the log of every write that passed the hook, and the
  result of a last start without faults (in this process)."""
  root = tmp_path_factory.mktemp('chain')
  work, log = str(root / 'w'), str(root / 'writes.log')
  runs = []
  for spec, _ in KILLS:
    found = launch.steps_saved(work)
    cmd = launch.main_command(work, 6, *CHAIN_FLAGS)
    out = launch.run(cmd, env=launch.env(MDT_JAX_FAULT=spec, MDT_JAX_FAULT_LOG=log))
    runs.append((spec, found, out, _evaluations(work)))
  os.environ[faults.LOG_ENV] = log  # the last start: resumes and finishes
  try:
    final = train_and_evaluate(_config(), work)
  finally:
    del os.environ[faults.LOG_ENV]
  return work, log, runs, final


def test_every_write_site_has_a_fault_case():
  assert SITE_CASES == set(faults.SITES)


def test_each_kill_is_resumed_and_the_end_is_bit_identical(chain, full_run):
  work, _, runs, final = chain
  for i, (spec, found, out, _) in enumerate(runs):
    action = spec.split(':')[1]
    want = -9 if action == 'kill' else 2
    assert out.returncode == want, f'{spec}: {out.stdout[-3000:]}'
    assert 'Traceback' not in out.stdout.split('error: ')[-1]
    resumed = [int(s) for s in re.findall(r'resuming from step (\d+)', out.stdout)]
    assert resumed == found[-1:], f'{spec}: resumed from {resumed}, found {found}'
    if i and KILLS[i - 1][1] is not None:
      assert found[-1:] == ([KILLS[i - 1][1]] if KILLS[i - 1][1] else []), spec
    before = KILLS[i - 1][0] if i else ''
    if before.endswith(':kill') and before != 'lock@1:kill':
      # the run killed before held the lock: taken over, no manual step
      assert re.search(r'taking over the lock of .*: pid \d+ is not running', out.stdout), spec
  assert final['step'] == 6
  want = full_run[1]['state']
  for name in ('params', 'ema_params', 'opt_state'):
    for a, b in zip(_leaves(getattr(final['state'], name)), _leaves(getattr(want, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert not os.path.exists(os.path.join(work, 'lock.json'))  # released at the end


def test_an_evaluation_killed_between_its_files_is_run_again(chain):
  """Killed after eval.json and before the history: the next start finds the evaluation missing
  from the history, runs it again and writes both; the history holds it once."""
  work, _, runs, final = chain
  _, _, _, (history, lost) = {r[0]: r for r in runs}['eval@2:kill']
  assert history == [] and lost['step'] == 6
  steps, written = _evaluations(work)
  assert steps == [6]
  assert np.isfinite(written['digits_fd']) and 0 <= written['digits_class_accuracy'] <= 1
  # the same EMA weights (restored at step 6, or trained again from 3): the same evaluation
  scores = lambda r: {k: r[k] for k in ('digits_fd', 'digits_class_accuracy', 'eval_num_samples')}
  assert scores(written) == scores(lost) == scores(final)


def test_a_full_disk_stops_the_run_with_one_line_and_the_last_good_checkpoint(chain):
  work, _, runs, _ = chain
  out = {spec: out for spec, _, out, _ in runs}['checkpoint@6:enospc']
  assert re.fullmatch(
      rf'error: writing {work}/checkpoints/6.orbax-checkpoint-tmp/\w+.orbax-checkpoint-tmp '
      r'failed: \[Errno 28\] No space left on device \(injected at checkpoint@6\); the last good '
      rf'checkpoint is step 3 \({work}/checkpoints/3\): the next start resumes from it',
      launch.one_line(out.stdout, logged_before=True),
  )
  assert launch.steps_saved(work)[0] == 3  # kept, and loaded by the next start


def test_every_file_of_the_run_passed_the_hook(chain):
  """Each file in the finished workdir was written through the hook (checkpoint folders: their
  items' commits), and the run's writes cover every run-level site."""
  work, log, _, _ = chain
  writes = [line.split('\t') for line in open(log).read().splitlines()]
  assert {site for site, _, _ in writes} == SITE_CASES - set(FILE_LEVEL)
  logged = {path for _, _, path in writes}
  for folder, _, names in os.walk(work):
    for name in names:
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, work)
      if rel.startswith('checkpoints' + os.sep) or '.tmp-' in name:
        continue  # orbax's files (passed as items) and temporary files of killed writes
      assert path in logged, f'{rel} was written without passing the fault hook'


# -------------------------------------------------------------------- failed writes, in-process


@pytest.fixture
def workdir(full_run, tmp_path):
  work = tmp_path / 'w'
  shutil.copytree(full_run[0], work)
  return work


def _snapshot(folder) -> dict:
  return {
      os.path.relpath(os.path.join(d, f), folder): hashlib.sha1(
          open(os.path.join(d, f), 'rb').read()
      ).hexdigest()
      for d, _, fs in os.walk(folder)
      for f in fs
  }


@pytest.mark.parametrize(
    'spec, file',
    [
        ('lock@1:enospc', 'lock.json'),
        ('config@1:enospc', 'config.json'),
        ('events@1:oserror', 'events.out.tfevents.'),
        ('eval@1:enospc', 'eval.json'),  # the step-6 evaluation, missing on resume: run first
    ],
)
def test_a_failed_write_names_the_file_and_keeps_the_checkpoints(workdir, monkeypatch, spec, file):
  monkeypatch.setenv(faults.ENV, spec)
  faults.reset()
  checkpoints = _snapshot(workdir / 'checkpoints')
  with pytest.raises(errors.WriteFailed) as e:
    train_and_evaluate(_config(), str(workdir))
  errno = 'Errno 28' if 'enospc' in spec else 'Errno 5'
  assert re.match(rf'writing {workdir}/{re.escape(file)}.* failed: \[{errno}\]', str(e.value))
  assert errors.is_user_error(e.value)
  assert _snapshot(workdir / 'checkpoints') == checkpoints
  assert not (workdir / 'lock.json').exists()  # released on the way out
  monkeypatch.delenv(faults.ENV)
  assert mdt_jax.load_pretrained(str(workdir)) is not None  # the last checkpoint loads


def test_a_failed_run_waits_for_writing_threads_not_for_idle_pool_workers():
  """After a failed write the command line waits for the threads still writing (an orbax
  commit reporting its error), not for pool workers idle on their queue (grain's prefetch,
  orbax's metadata store), which end only at exit."""
  idle, busy = ThreadPoolExecutor(1, 'idle'), ThreadPoolExecutor(1, 'busy')
  release, done = threading.Event(), []
  try:
    idle.submit(lambda: None).result()
    running = busy.submit(release.wait)  # a pool worker inside a task: writing
    writer = threading.Thread(target=lambda: (release.wait(), done.append('written')))
    writer.start()
    workers = {t.name: t for t in threading.enumerate() if t.name in ('idle_0', 'busy_0')}
    assert errors._idle_pool_worker(workers['idle_0'])
    assert not errors._idle_pool_worker(workers['busy_0'])
    assert not errors._idle_pool_worker(writer)
    waiting = threading.Thread(target=errors.join_background_writes, args=(60,), daemon=True)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # the writer and the busy worker hold it
    release.set()
    waiting.join(20)  # not the 60 s the idle workers would hold it for
    assert not waiting.is_alive() and done == ['written'] and running.done()
    assert all(errors._idle_pool_worker(t) for t in workers.values())  # left waiting, not joined
  finally:
    release.set()
    idle.shutdown()
    busy.shutdown()


_KILLED_WRITE = r"""
import sys
from mdt_jax import atomic
atomic.write_json(sys.argv[1], {'evaluations': ['new']})
"""


@pytest.mark.parametrize('site', sorted(FILE_LEVEL))
def test_atomic_files_killed_or_failed_keep_the_old_file(tmp_path, monkeypatch, site):
  """The site no training run writes: an atomic file (a sampling shard) killed or failed at its
  write keeps its old content."""
  path = tmp_path / FILE_LEVEL[site]
  path.write_text(json.dumps({'evaluations': ['old']}))
  env = launch.env(**{faults.ENV: f'{site}@1:kill'})
  out = subprocess.run([sys.executable, '-c', _KILLED_WRITE, str(path)], env=env)
  assert out.returncode == -9
  assert json.loads(path.read_text()) == {'evaluations': ['old']}
  monkeypatch.setenv(faults.ENV, f'{site}@1:enospc')
  faults.reset()
  with pytest.raises(errors.WriteFailed, match=rf'writing {path} failed: \[Errno 28\]'):
    atomic.write_json(str(path), {'evaluations': ['new']})
  assert json.loads(path.read_text()) == {'evaluations': ['old']}
  assert not (tmp_path / f'{path.name}.tmp-{os.getpid()}').exists()  # the failed write's


# ------------------------------------------------------------------- object storage uploads


class _FlakyProxy(http.server.ThreadingHTTPServer):
  """A loopback proxy in front of the GCS emulator that answers the next uploads as ``plan``
  says: an HTTP status ('503'), 'drop' (the connection closed, no answer) or 'pass'."""

  def __init__(self, target: str, plan: list[str]):
    self.target, self.plan, self.seen = urllib.parse.urlparse(target), plan, []
    super().__init__(('127.0.0.1', 0), _ProxyHandler)
    threading.Thread(target=self.serve_forever, daemon=True).start()

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.server_address[1]}'


class _ProxyHandler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    del args

  def _relay(self):
    body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    upload = '/upload/' in self.path
    action = self.server.plan.pop(0) if upload and self.server.plan else 'pass'
    if upload:
      self.server.seen.append(action)
    if action == 'drop':
      self.connection.close()
      return
    if action != 'pass':  # GCS's error body
      code = int(action)
      data = json.dumps({'error': {'code': code, 'message': http.HTTPStatus(code).phrase}})
      self.send_response(code)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data.encode())
      return
    target = self.server.target
    conn = http.client.HTTPConnection(target.hostname, target.port)
    headers = {k: v for k, v in self.headers.items() if k.lower() != 'host'}
    conn.request(self.command, self.path, body, headers)
    answer = conn.getresponse()
    data = answer.read()
    self.send_response(answer.status)
    for k, v in answer.getheaders():
      if k.lower() not in ('transfer-encoding', 'content-length', 'connection'):
        self.send_header(k, v)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay


@pytest.fixture
def flaky_gcs(gcs, monkeypatch):
  """The session's bucket behind a _FlakyProxy (gcsfs pointed at it: a new client)."""
  import gcsfs

  proxy = _FlakyProxy(os.environ['STORAGE_EMULATOR_HOST'], [])
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', proxy.url)
  gcsfs.GCSFileSystem.clear_instance_cache()
  yield gcs, proxy
  proxy.shutdown()
  gcsfs.GCSFileSystem.clear_instance_cache()


def _backoff_skipped(monkeypatch) -> list[float]:
  """gcsfs's backoff sleeps (asyncio.sleep) skipped; the delays it asked for, in order."""
  import asyncio

  real_sleep, delays = asyncio.sleep, []

  async def no_backoff(delay, *args, **kwargs):
    if delay:
      delays.append(delay)
    return await real_sleep(0, *args, **kwargs)

  monkeypatch.setattr(asyncio, 'sleep', no_backoff)
  return delays


def test_uploads_are_retried_after_5xx_and_dropped_connections(flaky_gcs, monkeypatch):
  gcs, proxy = flaky_gcs
  delays = _backoff_skipped(monkeypatch)
  proxy.plan[:] = ['503', 'drop', '500']
  atomic.write_json(f'{gcs}/flaky/eval_history.json', {'evaluations': [1]})
  assert proxy.seen == ['503', 'drop', '500', 'pass']  # gcsfs retried
  assert len(delays) == 3 and delays == sorted(delays), delays  # after a growing backoff
  assert json.loads(atomic.paths.path(f'{gcs}/flaky/eval_history.json').read_text()) == {
      'evaluations': [1]
  }


def test_an_upload_that_keeps_failing_stops_with_one_line(flaky_gcs, monkeypatch):
  gcs, proxy = flaky_gcs
  _backoff_skipped(monkeypatch)  # gcsfs's backoff, about 31 s
  path = f'{gcs}/flaky/samples.npz'
  for plan, what in [(['503'] * 6, 'Service Unavailable'), (['403'], 'Forbidden')]:
    proxy.plan[:], proxy.seen[:] = plan, []
    with pytest.raises(errors.WriteFailed) as e:
      atomic.write_bytes(path, b'x')
    assert proxy.seen == plan  # every retry (a 403 is not retried), then a stop
    assert re.match(rf'writing {path} failed: .*{what}', str(e.value)), str(e.value)
    assert errors.is_user_error(e.value)
    assert not atomic.paths.path(path).exists()
