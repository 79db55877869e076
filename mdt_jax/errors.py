"""Errors the user can fix, and the one way every command line reports them.

A config value, a path, a shape, a flag, a lock held by another run, a damaged or foreign file:
the user can fix each, so a command line prints it as one line ``error: <message>`` on stderr,
without a traceback, and exits with status 2 (``run``, which each command line's ``__main__``
calls instead of ``absl.app.run``). Anything else is an internal error and keeps its traceback.

Which errors are the user's:

* ``UserError`` and its kinds below (new checks raise these);
* a ``ValueError`` or a path error (``FileNotFoundError``, ``FileExistsError``,
  ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``) raised by this package's
  own code: its checks raise them with a message naming the value and what was expected. The
  same types raised inside a library (jax, orbax, numpy) are internal and keep their traceback;
* an ``absl.app.UsageError`` and a flag that does not parse.

``MDT_JAX_TRACEBACK=1`` in the environment keeps the traceback of every error.
"""

from __future__ import annotations

import concurrent.futures.thread
import functools
import os
import sys
import threading
import time
from typing import Callable, NoReturn

from absl import app, flags

EXIT_STATUS = 2
TRACEBACK_ENV = 'MDT_JAX_TRACEBACK'
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_OWN_TYPES = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class UserError(Exception):
  """An error the user can fix: printed as one line ``error: ...``, exit status 2."""


class ConfigError(UserError, ValueError):
  """A config value, flag or argument that cannot be used."""


class BadFile(UserError, ValueError):
  """A file or folder that is not what it should be (truncated, not JSON, missing a part)."""


class WriteFailed(UserError, OSError):
  """A write that failed (a full disk, a failed upload), naming the file."""

  def __init__(self, path: str, error: BaseException, hint: str = ''):
    self.path, self.error, self.hint = path, error, hint
    errno = getattr(error, 'errno', None)
    super().__init__(errno, self.message())

  def message(self) -> str:
    what = getattr(error := self.error, 'strerror', None) or str(error) or type(error).__name__
    code = f'[Errno {error.errno}] ' if getattr(error, 'errno', None) else ''
    return f'writing {self.path} failed: {code}{what}' + (f'; {self.hint}' if self.hint else '')

  def with_hint(self, hint: str) -> WriteFailed:
    """The same error with ``hint`` (e.g. which checkpoint is the last good one) appended."""
    return WriteFailed(self.path, self.error, hint)

  def __str__(self) -> str:
    return self.message()


class Locked(UserError, RuntimeError):
  """A workdir another run holds."""


def _raised_here(error: BaseException) -> bool:
  """True when the innermost frame of the traceback is in this package's code."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE)


def is_user_error(error: BaseException) -> bool:
  """Whether ``error`` is one the user can fix (see the module docstring)."""
  if isinstance(error, (UserError, app.UsageError, flags.Error)):
    return True
  return isinstance(error, _OWN_TYPES) and _raised_here(error)


def one_line(error: BaseException) -> str:
  """The message of an error on one line."""
  text = ' '.join(str(error).split())
  if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename:
    text = text or f'{error.strerror}: {error.filename}'
  return text or type(error).__name__


def report(error: BaseException) -> NoReturn:
  """Print ``error: <message>`` on stderr and exit with status 2."""
  sys.stderr.write(f'error: {one_line(error)}\n')
  sys.stderr.flush()
  sys.exit(EXIT_STATUS)


def guard(main: Callable) -> Callable:
  """``main`` reporting user errors as one line (``report``); other errors propagate."""

  @functools.wraps(main)
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - sorted by is_user_error; the rest is raised again
      if os.environ.get(TRACEBACK_ENV) or not is_user_error(e):
        raise
      report(e)

  return guarded


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with a flag that does not parse reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    report(ConfigError(f'{e} (--helpfull lists the flags)'))


def run(main: Callable[[list[str]], object]) -> NoReturn:
  """``absl.app.run(main)`` with user errors (and flags that do not parse) as one line."""
  app.run(guard(main), flags_parser=parse_flags)


def join_background_writes(timeout_s: float = 30.0, poll_s: float = 0.05) -> None:
  """Waits (at most `timeout_s` in all) for the threads still writing, such as orbax's async
  commits, so that what they report comes before the run's own one-line error, not after it
  at interpreter shutdown. A thread pool's worker waiting for work (grain's prefetch, orbax's
  metadata store) is not writing: it ends only when its pool shuts down, at exit."""
  deadline = time.monotonic() + timeout_s
  # polled, not joined: orbax's threads raise TimeoutError from a join that times out
  while time.monotonic() < deadline and any(not _idle_pool_worker(t) for t in _other_threads()):
    time.sleep(poll_s)


def _other_threads() -> list[threading.Thread]:
  main = threading.main_thread()
  return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def _idle_pool_worker(thread: threading.Thread) -> bool:
  """A concurrent.futures worker thread blocked on its pool's queue: its innermost Python frame
  is the worker loop itself (a worker running a task has the task's frames above it)."""
  frame = sys._current_frames().get(thread.ident)  # noqa: SLF001 - the stdlib's frame snapshot
  return frame is not None and _POOL_WORKER is not None and frame.f_code is _POOL_WORKER.__code__


# the worker loop of concurrent.futures (a private name: without it, every thread is waited for)
_POOL_WORKER = getattr(concurrent.futures.thread, '_worker', None)
