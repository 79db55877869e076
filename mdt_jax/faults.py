"""The fault hook of the file layer: fail a chosen write, or kill the process at it.

Every write a training run makes passes ``check(site, path)`` at its most fragile point (an
atomic file: its bytes written to the temporary file, before the rename; a checkpoint: inside
orbax's asynchronous commit, before the step folder is renamed into place; the event file: before
each record). Nothing happens unless ``MDT_JAX_FAULT`` names the write::

    MDT_JAX_FAULT=SITE[@N]:ACTION[,SITE[@N]:ACTION...]

SITE is a write site (``SITES``), N the ordinal of that site's write in this process (1 = the
first, the default), ACTION one of

* ``kill``: SIGKILL this process there (as a preemption without notice, or an OOM kill);
* ``stop``: SIGSTOP it there (a run that hangs, alive, holding its workdir);
* ``enospc``: raise ``OSError(ENOSPC)`` (a full disk or bucket quota);
* ``oserror``: raise ``OSError(EIO)`` (any other failed write).

``MDT_JAX_FAULT_LOG=FILE`` appends ``SITE<TAB>PATH`` for every write that passes the hook, so a
test sees which sites a run writes.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading

ENV = 'MDT_JAX_FAULT'
LOG_ENV = 'MDT_JAX_FAULT_LOG'
ACTIONS = ('kill', 'stop', 'enospc', 'oserror')

# The write sites of a training run, and what each writes (W: the workdir).
SITES = {
    'lock': 'W/lock.json, the workdir lock (mdt_jax/training/lock.py)',
    'config': 'W/config.json, the run config',
    'checkpoint': "W/checkpoints/<step>, one per array item's commit inside orbax's async save",
    'data_position': "W/checkpoints/<step>/data, the data iterator's position",
    'events': 'W/events.out.tfevents.*, each TensorBoard record',
    'samples': 'W/samples/grid_<step>.png, the sample grids',
    'eval': 'W/eval_history.json and W/eval_*.json, the evaluations',
    'file': 'any other atomic file (sampling shards, model folders, caches)',
}

_SPEC = re.compile(r'^(?P<site>[a-z_]+)(?:@(?P<n>\d+))?:(?P<action>[a-z]+)$')
_counts: dict[str, int] = {}
_lock = threading.Lock()


def _plan() -> dict[tuple[str, int], str]:
  spec = os.environ.get(ENV, '')
  plan = {}
  for part in filter(None, (p.strip() for p in spec.split(','))):
    m = _SPEC.match(part)
    if not m or m['site'] not in SITES or m['action'] not in ACTIONS:
      raise ValueError(
          f'{ENV}={spec!r}: {part!r} is not SITE[@N]:ACTION with SITE one of {sorted(SITES)} '
          f'and ACTION one of {ACTIONS}'
      )
    plan[(m['site'], int(m['n'] or 1))] = m['action']
  return plan


def check(site: str, path: str) -> None:
  """Count a write of ``site`` to ``path``; fail it or kill here if ``MDT_JAX_FAULT`` says so."""
  if site not in SITES:
    raise ValueError(f'unknown write site {site!r}; add it to mdt_jax.faults.SITES')
  if not os.environ.get(ENV) and not os.environ.get(LOG_ENV):
    return
  with _lock:
    _counts[site] = n = _counts.get(site, 0) + 1
    log = os.environ.get(LOG_ENV)
    if log:
      with open(log, 'a') as f:
        f.write(f'{site}\t{n}\t{path}\n')
  action = _plan().get((site, n))
  if action in ('kill', 'stop'):
    os.kill(os.getpid(), signal.SIGKILL if action == 'kill' else signal.SIGSTOP)
  elif action == 'enospc':
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f' (injected at {site}@{n})')
  elif action == 'oserror':
    raise OSError(errno.EIO, os.strerror(errno.EIO) + f' (injected at {site}@{n})')


def reset() -> None:
  """Count every site's writes from 1 again (for tests that run several trainings in one
  process)."""
  with _lock:
    _counts.clear()


def site_of(path: str) -> str:
  """The site of an atomic file of a workdir, from its name."""
  name = os.path.basename(os.fspath(path))
  if name == 'config.json':
    return 'config'
  if name.startswith('grid_') and name.endswith('.png'):
    return 'samples'
  if name.startswith('eval') and name.endswith('.json'):
    return 'eval'
  if name == 'lock.json':
    return 'lock'
  if 'tfevents' in name:
    return 'events'
  return 'file'
