"""Paths as users type them: relative to the current folder, or remote URLs kept as they are.

Every entry point and every library function that hands a path to orbax, TensorStore or another
process resolves it here once, so a relative ``--workdir=runs/x`` means the same folder whatever
the library underneath expects (orbax refuses relative checkpoint paths).

``path()`` is the one file layer for local folders and object storage alike: an ``etils.epath``
Path, which reads and writes gs:// through fsspec/gcsfs (see docs/training_at_scale.md for why
gcsfs and not TensorFlow's gfile, and for the environment each library reads).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator

from etils import epath

from mdt_jax import errors

# epath sends gs:// to TensorFlow's gfile when TensorFlow is installed, whose GCS client cannot
# be pointed at anything but storage.googleapis.com. gcsfs reads the same buckets with the same
# credentials and honours an emulator, so the project's own files and orbax's metadata go through
# one tested client. Set before epath first picks a backend (it caches the choice); an explicit
# EPATH_USE_TF in the environment wins.
os.environ.setdefault('EPATH_USE_TF', 'false')

# scheme://... (gs://, s3://, hf://, file://): kept as typed; a Windows drive letter is no scheme
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]+://')


def is_remote(path: str | os.PathLike) -> bool:
  """True for a URL such as gs://bucket/run (object storage), False for a local path."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path (``~`` expanded, relative to the current folder), or the URL as is."""
  p = os.fspath(path)
  if not p:
    raise ValueError('an empty path was given where a file or folder was expected')
  if is_remote(p):
    return p
  return os.path.abspath(os.path.expanduser(p))


def resolve_optional(path: str | os.PathLike | None) -> str | None:
  """``resolve`` for optional paths: None and '' stay None."""
  return resolve(path) if path else None


def cache_dir() -> str:
  """The folder of converted weights and trained helper models: $MDT_JAX_CACHE (resolved like any
  typed path, when the process reads it) or ~/.cache/mdt_jax."""
  return resolve(os.environ.get('MDT_JAX_CACHE') or '~/.cache/mdt_jax')


def path(p: str | os.PathLike) -> epath.Path:
  """The file layer's Path of a typed path (resolved as ``resolve`` does), local or gs://."""
  return epath.Path(resolve(p))


def make_folder(p: str | os.PathLike, what: str) -> str:
  """``resolve(p)``, made as a local folder if missing (object storage has no folders to make);
  a path that is a file, or under one, is refused naming ``what`` (e.g. '--workdir')."""
  r = resolve(p)
  if is_remote(r):
    return r
  if os.path.exists(r) and not os.path.isdir(r):
    raise errors.ConfigError(f'{what} {r} is a file, expected a folder (or a path to make one at)')
  try:
    os.makedirs(r, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(f'{what} {r} cannot be made as a folder: {e.strerror or e}') from e
  return r


def read_json(p: str | os.PathLike, expected: str, hint: str = ''):
  """The JSON value of a file; a file that is not JSON (truncated, overwritten) is refused
  naming it, what it should hold (``expected``) and ``hint`` (how to go on)."""
  r = resolve(p)
  text = path(r).read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    where = f'{e.msg} (line {e.lineno}, column {e.colno})' if hasattr(e, 'msg') else str(e)
    raise errors.BadFile(
        f'{r} is not valid JSON ({len(text)} characters; {where}): expected {expected}'
        + (f'; {hint}' if hint else '')
    ) from None


def require_local(p: str | os.PathLike, what: str, why: str) -> str:
  """``resolve(p)``, refusing object storage for a use that needs a local file system."""
  r = resolve(p)
  if is_remote(r):
    raise ValueError(
        f'{what} {r!r} is on object storage, which this cannot use ({why}); give a local path'
    )
  return r


def emulator_env(url: str) -> dict[str, str]:
  """The environment that points every GCS client the project uses at a GCS emulator at ``url``
  (e.g. fake-gcs-server on http://127.0.0.1:PORT), without credentials.

  The clients: gcsfs (this module's files, orbax's metadata), TensorStore (orbax's arrays) and
  ArrayRecord's reader (google-cloud-cpp). The metadata-server variables point at a closed
  loopback port, so a credential lookup that slipped through fails here instead of leaving the
  machine.
  """
  return {
      'STORAGE_EMULATOR_HOST': url,  # gcsfs, google-cloud-storage
      'FSSPEC_GCS_TOKEN': 'anon',  # gcsfs: no credential lookup
      # gcsfs: the plain client; the default one first asks a gRPC API for the bucket's kind
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'EPATH_USE_TF': 'false',
      'TENSORSTORE_GCS_HTTP_URL': url,  # TensorStore
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore: a fixed token
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # google-cloud-cpp (ArrayRecord)
      'GCE_METADATA_HOST': '127.0.0.1:9',
      'GCE_METADATA_IP': '127.0.0.1:9',
      'NO_GCE_CHECK': 'true',
  }


def load_safetensors(p: str | os.PathLike) -> dict:
  """The arrays of a .safetensors file (numpy), local (memory-mapped read) or on object storage
  (read whole)."""
  from safetensors.numpy import load, load_file

  r = resolve(p)
  return load(path(r).read_bytes()) if is_remote(r) else load_file(r)


@contextlib.contextmanager
def local_folder(p: str | os.PathLike, exclude: tuple[str, ...] = ()) -> Iterator[str]:
  """A local folder with the files of ``p``: ``p`` itself when local, else a temporary copy
  (removed afterwards), for libraries that read only local files. ``exclude``: top-level names
  not copied."""
  r = resolve(p)
  if not is_remote(r):
    yield r
    return
  src = path(r)
  with tempfile.TemporaryDirectory(prefix='mdt_jax-copy-') as tmp:
    for f in src.rglob('*'):
      rel = os.fspath(f)[len(os.fspath(src)) :].lstrip('/')
      if rel.split('/')[0] in exclude or not f.is_file():
        continue
      dst = os.path.join(tmp, *rel.split('/'))
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      with f.open('rb') as a, open(dst, 'wb') as b:
        shutil.copyfileobj(a, b, 16 << 20)
    yield tmp


INCEPTION_WEIGHTS_FILE = 'inception_fid.safetensors'


def default_inception_weights() -> str:
  """Where `python -m mdt_jax.evaluate` and the training loop's evaluation look for the FID
  Inception weights (in cache_dir, read when called)."""
  return os.path.join(cache_dir(), INCEPTION_WEIGHTS_FILE)
