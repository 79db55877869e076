"""Folders written whole or not at all: a temporary folder beside the target, renamed into place."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def share_modes(folder: str) -> None:
  """Give a folder made by mkdtemp (owner-only) the modes the umask gives new files."""
  umask = os.umask(0)
  os.umask(umask)
  for root, _, files in os.walk(folder):
    os.chmod(root, 0o777 & ~umask)
    for f in files:
      os.chmod(os.path.join(root, f), 0o666 & ~umask)


def check_writable(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) \
      and not overwrite:
    raise FileExistsError(f'{out_dir} exists and is not empty (pass overwrite=True, or '
                          '--overwrite, to replace it)')


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yield an empty temporary folder; when the block succeeds it replaces ``out_dir``.

  On any error the temporary folder is removed and ``out_dir`` is left as it was.
  """
  out_dir = os.path.abspath(out_dir)
  check_writable(out_dir, overwrite)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(out_dir)}-', dir=parent)
  try:
    yield tmp
    share_modes(tmp)
    if os.path.lexists(out_dir):
      old = tempfile.mkdtemp(prefix='.old-', dir=parent)
      os.rename(out_dir, os.path.join(old, 'x'))
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
