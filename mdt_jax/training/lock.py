"""One writer per workdir: the lock a training run holds on its workdir.

``W/lock.json`` names the holder (host, pid, start time, a heartbeat time and a token). A run
takes it at start and removes it at the end; a second run on the workdir is refused at once with
one line naming the workdir and the holder. A lock whose holder is gone is taken over with a
warning, so a job restarted after a SIGKILL or a preemption needs no manual step:

* same host and its pid is not running, or
* its heartbeat is older than ``stale_after_s`` (another host: the pid cannot be checked). The
  holder refreshes the heartbeat from a background thread every ``stale_after_s / 4`` seconds.

``force`` (``--force_unlock``) takes any lock, for the rare case that neither applies (a host
renamed, a clock far off).

Local workdirs: the lock file is made whole beside the workdir's files and linked into place
(``os.link`` fails when the name exists), so no two runs both make it. On object storage it is
written with the precondition ``ifGenerationMatch=0`` (only when no object of that name exists)
and replaced, on a takeover, with ``ifGenerationMatch=<the stale lock's generation>``: two runs
that both find a stale lock cannot both take it.

Several processes: process 0 takes the lock for the job and tells the others (a broadcast), so
every process is refused together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid

import jax
from absl import logging

from mdt_jax import atomic, errors, faults, paths

LOCK_FILE = 'lock.json'
DEFAULT_STALE_AFTER_S = 600.0
SITE = 'lock'
_BOUNDARY = '==mdt_jax-lock=='


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: float
  heartbeat: float
  token: str

  def describe(self) -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))
    return (
        f'pid {self.pid} on {self.host}, started {started}, heartbeat '
        f'{max(0.0, time.time() - self.heartbeat):.0f} s ago'
    )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _gone(holder: Holder, stale_after_s: float) -> str:
  """Why the holder is gone ('' when it may be running)."""
  if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
    return f'pid {holder.pid} is not running on this host'
  age = time.time() - holder.heartbeat
  if age > stale_after_s:
    return f'its heartbeat is {age:.0f} s old (stale after {stale_after_s:.0f} s)'
  return ''


class _LocalStore:
  """The lock file on a local disk."""

  def __init__(self, path: str):
    self.path = path

  def read(self) -> tuple[dict | None, object]:
    try:
      with open(self.path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      return None, None
    return _parse(data, self.path), None

  def create(self, data: bytes) -> bool:
    tmp = f'{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(tmp, 'wb') as f:
        f.write(data)
      faults.check(SITE, self.path)
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      raise errors.WriteFailed(self.path, e) from e
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)

  def replace(self, data: bytes, version) -> bool:
    del version
    atomic.write_bytes(self.path, data, SITE)
    return True

  def remove(self) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


class _ObjectStore:
  """The lock object on object storage (gcsfs), written under generation preconditions."""

  def __init__(self, path: str):
    import gcsfs  # object storage only

    self.path = path
    self.fs = gcsfs.GCSFileSystem()
    self.bucket, self.key, _ = self.fs.split_path(path)

  def read(self) -> tuple[dict | None, object]:
    try:
      info = self.fs.info(self.path)
      data = self.fs.cat_file(self.path)
    except FileNotFoundError:
      return None, None
    return _parse(data, self.path), info.get('generation')

  def _upload(self, data: bytes, generation) -> bool:
    """One multipart upload under ``ifGenerationMatch`` (0: only if no such object exists):
    False when the precondition fails (HTTP 412, which gcsfs raises as FileExistsError)."""
    faults.check(SITE, self.path)
    meta = json.dumps({'name': self.key})
    body = (
        (
            f'--{_BOUNDARY}\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n'
            f'--{_BOUNDARY}\nContent-Type: application/json\n\n'
        ).encode()
        + data
        + f'\n--{_BOUNDARY}--'.encode()
    )
    try:
      self.fs.call(
          'POST',
          f'{self.fs._location}/upload/storage/v1/b/{self.bucket}/o',
          uploadType='multipart',
          headers={'Content-Type': f'multipart/related; boundary="{_BOUNDARY}"'},
          data=body,
          json_out=True,
          ifGenerationMatch=str(generation),
      )
    except FileExistsError:
      return False
    except OSError as e:
      raise errors.WriteFailed(self.path, e) from e
    finally:
      self.fs.invalidate_cache(self.path)
    return True

  def create(self, data: bytes) -> bool:
    return self._upload(data, 0)

  def replace(self, data: bytes, version) -> bool:
    return self._upload(data, version)

  def remove(self) -> None:
    try:
      self.fs.rm_file(self.path)
    except FileNotFoundError:
      pass


def _parse(data: bytes, where: str) -> dict:
  try:
    return json.loads(data.decode())
  except ValueError:
    return {'unreadable': f'{where} ({len(data)} bytes) is not the JSON a lock holds'}


# Set by the command line (mdt_jax.main's --force_unlock and --lock_stale_after_s) for the
# runs of this process.
SETTINGS = {'stale_after_s': DEFAULT_STALE_AFTER_S, 'force': False}
_held_here: set[str] = set()  # the tokens of the locks this process holds now


def configure(*, stale_after_s: float | None = None, force: bool | None = None) -> None:
  if stale_after_s is not None:
    if not stale_after_s > 0:
      raise errors.ConfigError(f'--lock_stale_after_s must be > 0 seconds, got {stale_after_s}')
    SETTINGS['stale_after_s'] = float(stale_after_s)
  if force is not None:
    SETTINGS['force'] = bool(force)


def _agree(error: errors.Locked | None, workdir: str) -> None:
  """Raise on every process when process 0 found the workdir locked (one process: ``error``)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    refused = int(multihost_utils.broadcast_one_to_all(int(error is not None)))
    if refused and error is None:
      error = errors.Locked(f'workdir {workdir} is in use by another run (process 0 found it)')
  if error is not None:
    raise error


class WorkdirLock:
  """The lock of one workdir for one run::

  with WorkdirLock(workdir) as lock:  # refused here when a live run holds it (nothing written)
    ...                               # checks that write nothing
    lock.acquire()                    # taken (or refused) before the run's first write
    ...
                                      # released at the end of the block
  """

  def __init__(
      self, workdir: str, *, stale_after_s: float | None = None, force: bool | None = None
  ):
    self.workdir = paths.resolve(workdir)
    self.path = os.fspath(paths.path(self.workdir) / LOCK_FILE)
    self.stale_after_s = SETTINGS['stale_after_s'] if stale_after_s is None else stale_after_s
    self.force = SETTINGS['force'] if force is None else force
    self.store = None
    self.holder = None
    self._version = None
    self._stop = threading.Event()
    self._thread = None

  def _open(self):
    if self.store is None:
      remote = paths.is_remote(self.path)
      self.store = _ObjectStore(self.path) if remote else _LocalStore(self.path)
    return self.store

  def _new_holder(self) -> Holder:
    now = time.time()
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=now,
        heartbeat=now,
        token=uuid.uuid4().hex,
    )

  def _refuse(self, message: str) -> errors.Locked:
    return errors.Locked(
        f'workdir {self.workdir} is in use: {message}. Stop that run first; if it is gone, '
        f'remove {self.path} or pass --force_unlock'
    )

  def _why_free(self, found: dict) -> tuple[Holder | None, str]:
    """(the holder, why it is gone: '' when it may be running)."""
    if 'unreadable' in found:
      return None, found['unreadable']
    holder = Holder(**{f.name: found[f.name] for f in dataclasses.fields(Holder)})
    if holder.pid == os.getpid() and holder.host == socket.gethostname():
      if holder.token not in _held_here:
        return holder, 'an earlier run of this process left it'
      return holder, ''
    return holder, _gone(holder, self.stale_after_s)

  def _live_holder(self) -> errors.Locked | None:
    found, _ = self._open().read()
    if found is None or self.force:
      return None
    holder, why = self._why_free(found)
    return None if why else self._refuse(f'held by {holder.describe()} ({self.path})')

  def __enter__(self) -> WorkdirLock:
    """Refuse a workdir a live run holds, before any work (writes nothing)."""
    if not paths.is_remote(self.workdir) and not os.path.isdir(self.workdir):
      return self  # a new workdir: nobody holds it yet
    _agree(self._live_holder() if jax.process_index() == 0 else None, self.workdir)
    return self

  def _take(self) -> None:
    store = self._open()
    for _ in range(3):  # a lock removed or replaced between the read and the write: read again
      self.holder = self._new_holder()
      data = json.dumps(dataclasses.asdict(self.holder)).encode()
      if store.create(data):
        break
      found, version = store.read()
      if found is None:
        continue
      holder, why = self._why_free(found)
      if not why and not self.force:
        self.holder = None
        raise self._refuse(f'held by {holder.describe()} ({self.path})')
      logging.warning(
          'taking over the lock of %s from %s: %s',
          self.workdir,
          holder.describe() if holder else 'an unreadable lock file',
          why or '--force_unlock',
      )
      if store.replace(data, version):
        break
    else:
      self.holder = None
      raise self._refuse(f'its lock {self.path} changed hands while this run tried to take it')
    self._version = store.read()[1]
    _held_here.add(self.holder.token)

  def acquire(self) -> WorkdirLock:
    """Take the lock (process 0 for the job), or raise errors.Locked naming the holder."""
    error = None
    if jax.process_index() == 0:
      try:
        self._take()
      except errors.Locked as e:
        error = e
    _agree(error, self.workdir)
    if self.holder is not None:
      self._thread = threading.Thread(target=self._beat, name='workdir-lock', daemon=True)
      self._thread.start()
    return self

  def heartbeat(self) -> None:
    """Write the heartbeat time again (the background thread calls this)."""
    self.holder = dataclasses.replace(self.holder, heartbeat=time.time())
    data = json.dumps(dataclasses.asdict(self.holder)).encode()
    if self.store.replace(data, self._version):
      self._version = self.store.read()[1]

  def _beat(self) -> None:
    while not self._stop.wait(self.stale_after_s / 4):
      try:
        self.heartbeat()
      except Exception as e:  # noqa: BLE001 - a failed heartbeat must not stop training
        logging.warning('could not refresh the lock of %s: %s', self.workdir, e)

  def release(self) -> None:
    """Remove the lock if this run still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.holder is None:
      return
    token, self.holder = self.holder.token, None
    _held_here.discard(token)
    found, _ = self.store.read()
    if found is not None and found.get('token') == token:
      self.store.remove()

  def __exit__(self, *exc) -> None:
    self.release()
