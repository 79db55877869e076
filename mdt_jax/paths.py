"""Paths as users type them: relative to the current folder, or remote URLs kept as they are.

Every entry point and every library function that hands a path to orbax, TensorStore or another
process resolves it here once, so a relative ``--workdir=runs/x`` means the same folder whatever
the library underneath expects (orbax refuses relative checkpoint paths).
"""
from __future__ import annotations

import os
import re

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


INCEPTION_WEIGHTS_FILE = 'inception_fid.safetensors'


def default_inception_weights() -> str:
  """Where `python -m mdt_jax.evaluate` and the training loop's evaluation look for the FID
  Inception weights (in cache_dir, read when called)."""
  return os.path.join(cache_dir(), INCEPTION_WEIGHTS_FILE)
