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

import functools
import os
import sys
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
