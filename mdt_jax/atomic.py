"""Files and folders written whole or not at all, on a local disk and on object storage.

Local folders: a temporary folder beside the target, renamed into place. Object storage has no
rename of folders: a folder there is staged on the local disk, uploaded file by file, and then
published by one small marker object (``MARKER``, listing the files) written last; readers check
it with ``require_complete``. A single object needs no marker: it appears only when its upload
completes, and an upload stopped by an error is discarded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Iterator

from mdt_jax import errors, faults, paths

# The marker that publishes a folder on object storage (as orbax's commit_success.txt does for
# its checkpoints there): written after every other file of the folder.
MARKER = '_COMPLETE'
_COPY_CHUNK = 16 << 20


def share_modes(folder: str) -> None:
  """Give a folder made by mkdtemp (owner-only) the modes the umask gives new files."""
  umask = os.umask(0)
  os.umask(umask)
  for root, _, files in os.walk(folder):
    os.chmod(root, 0o777 & ~umask)
    for f in files:
      os.chmod(os.path.join(root, f), 0o666 & ~umask)


def check_writable(out_dir: str, overwrite: bool) -> None:
  p = paths.path(out_dir)
  if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
    raise FileExistsError(
        f'{out_dir} exists and is not empty (pass overwrite=True, or --overwrite, to replace it)'
    )


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yield an empty local temporary folder; when the block succeeds it replaces ``out_dir``.

  On any error the temporary folder is removed and ``out_dir`` is left as it was. For a gs://
  ``out_dir`` the folder is published with ``publish`` (marker last).
  """
  out_dir = paths.resolve(out_dir)
  check_writable(out_dir, overwrite)
  if paths.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix='mdt_jax-publish-') as tmp:
      yield tmp
      publish(tmp, out_dir)
    return
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


def publish(local_dir: str, out_dir: str) -> None:
  """Upload a local folder to ``out_dir`` (object storage), replacing what is there; the marker
  goes first out of an old folder and last into the new one, so a reader never takes a folder
  that is being replaced, or whose upload stopped, for a complete one."""
  dest = paths.path(out_dir)
  marker = dest / MARKER
  if marker.exists():
    marker.unlink()
  if dest.exists():
    dest.rmtree()
  files = {}
  for root, _, names in os.walk(local_dir):
    for name in sorted(names):
      src = os.path.join(root, name)
      rel = os.path.relpath(src, local_dir).replace(os.sep, '/')
      with open(src, 'rb') as f, (dest / rel).open('wb') as g:
        shutil.copyfileobj(f, g, _COPY_CHUNK)
      files[rel] = os.path.getsize(src)
  marker.write_text(json.dumps({'files': files}, indent=2, sort_keys=True))


def require_complete(folder: str, what: str = 'folder') -> None:
  """Refuse a folder on object storage whose marker is missing (local folders are renamed into
  place whole and need none)."""
  if paths.is_remote(folder) and not (paths.path(folder) / MARKER).exists():
    raise FileNotFoundError(
        f'{what} {folder} has no {MARKER} marker: on object storage a folder is published by '
        f'writing {MARKER} after all its files, so this one is being written, or its writer '
        'stopped before it finished; write it again'
    )


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """An exclusive lock on the local file ``path`` (made if missing) for the block: processes of
  this machine that fill one cache take turns, so the second finds what the first made. Where
  the file cannot be made or locks do not exist (not POSIX), the block runs unlocked."""
  try:
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, 'a')
  except (ImportError, OSError):
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


# Path errors already name the file and are the user's to fix as they are.
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _failed(path: str, error: BaseException) -> BaseException:
  """A failed write as errors.WriteFailed naming the file (path errors stay as they are)."""
  if isinstance(error, (errors.WriteFailed, *_PATH_ERRORS)):
    return error
  return errors.WriteFailed(path, error)


@contextlib.contextmanager
def atomic_file(path: str, site: str | None = None) -> Iterator[IO[bytes]]:
  """A binary file written whole or not at all: a local file through a temporary file renamed
  into place; an object directly (it appears when the upload completes; an error discards it).

  ``site``: the write's name for the fault hook (``mdt_jax.faults``; default: from the file name),
  called when the bytes are written and before they are published. A failed write raises
  ``errors.WriteFailed`` naming the file."""
  path = paths.resolve(path)
  site = site or faults.site_of(path)
  if paths.is_remote(path):
    f = paths.path(path).open('wb')
    try:
      yield f
      faults.check(site, path)
      f.close()  # the upload (gcsfs retries a 5xx or a dropped connection with backoff)
    except BaseException as e:
      f.discard()  # fsspec: abandon a started (resumable) upload
      f.closed = True  # and never commit the buffer of a small one when the file is collected
      if isinstance(e, OSError) or type(e).__module__.startswith('gcsfs'):
        raise _failed(path, e) from e  # gcsfs.retry.HttpError: the error left after retries
      raise
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      yield f
    faults.check(site, path)
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise _failed(path, e) from e
    raise


def write_bytes(path: str, data: bytes, site: str | None = None) -> None:
  """A file written whole or not at all."""
  with atomic_file(path, site) as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  """A text file (UTF-8) written whole or not at all."""
  with atomic_file(path) as f:
    f.write(text.encode())


def write_json(path: str, obj, indent: int = 2) -> None:
  """A JSON file written whole or not at all."""
  write_text(path, json.dumps(obj, indent=indent))


def save_npz(path: str, **arrays) -> None:
  """np.savez written whole or not at all (a killed run leaves no partial file)."""
  import numpy as np  # the rest of this module needs no numpy

  with atomic_file(path) as f:
    np.savez(f, **arrays)
