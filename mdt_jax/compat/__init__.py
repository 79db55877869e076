"""Private APIs of the libraries the project depends on, each behind one module of its own.

A library's private module can move in any release. Every use of one goes through the module
here named for the library, so that a move breaks one import with a message saying what moved
and which version was last known to hold it (tests/test_compat.py imports each of them).
"""

from __future__ import annotations

import importlib
from importlib import metadata


def private_attr(path: str, name: str, distribution: str, known_good: str, owner: str):
  """``path.name``, private to `distribution`; if it is gone, an ImportError naming it, the
  installed version, the last version known to hold it and the module to update (`owner`)."""
  try:
    return getattr(importlib.import_module(path), name)
  except (ImportError, AttributeError) as e:
    raise ImportError(
        f'{path}.{name} (private to {distribution}) is gone in {distribution} '
        f'{metadata.version(distribution)}; {known_good} had it. Update {owner} for the new '
        'version.'
    ) from e
