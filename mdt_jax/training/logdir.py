"""The metric writer of a workdir: TensorBoard events (and profiler traces) in the workdir.

The event writer (mdt_jax/training/events.py) and the profiler write local files; on a gs://
workdir both write into a local staging folder, and every ``flush()`` copies the files that
changed to the workdir whole (an event file grows; an object cannot be appended to, so it is
uploaded again, as TensorFlow's own GCS writer does on every flush).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
from absl import logging

from mdt_jax import errors, faults, paths
from mdt_jax.atomic import atomic_file
from mdt_jax.training.events import EventWriter

_CHUNK = 16 << 20


class MirroredWriter:
  """An EventWriter over a local staging folder, mirrored into ``workdir`` on flush()."""

  def __init__(self, workdir: str, *, just_logging: bool = False):
    self.workdir = workdir
    self.local = tempfile.mkdtemp(prefix='mdt_jax-tensorboard-')
    self._inner = EventWriter(self.local, just_logging=just_logging)
    self._sent: dict[str, tuple[int, int]] = {}

  def __getattr__(self, name):  # write_scalars, write_images: the EventWriter's
    return getattr(self._inner, name)

  def flush(self) -> None:
    self._inner.flush()
    self.sync()

  def close(self) -> None:
    self._inner.close()
    self.sync()
    shutil.rmtree(self.local, ignore_errors=True)

  def sync(self) -> None:
    """Copy new or grown files of the staging folder to the workdir."""
    for root, _, names in os.walk(self.local):
      for name in names:
        src = os.path.join(root, name)
        st = os.stat(src)
        rel = os.path.relpath(src, self.local)
        if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
          continue
        with open(src, 'rb') as f, atomic_file(os.path.join(self.workdir, rel)) as g:
          shutil.copyfileobj(f, g, _CHUNK)
        self._sent[rel] = (st.st_size, st.st_mtime_ns)


def _event_files(folder: str) -> set[str]:
  return {os.fspath(p) for p in paths.path(folder).glob('*tfevents*')}


class HookedCluWriter:
  """clu's default writer (logging and TensorFlow's summary writer) with the writes of its event
  file through the fault hook (site 'events', mdt_jax/faults.py), as EventWriter's.

  TensorFlow writes the file from C++: each ``write_*`` call queues a record, and the queue
  reaches the file on ``flush()`` (or when it is full). The hook is where Python still decides:
  before each ``write_*`` call queues its record and before each ``flush()`` writes the queue.
  A write that fails there, or inside TensorFlow (an ``OSError`` or TensorFlow's ``OpError``),
  is a ``WriteFailed`` naming the event file."""

  _WRITES = frozenset(
      f'write_{k}'
      for k in ('summaries', 'scalars', 'images', 'videos', 'audios', 'texts', 'histograms')
  ) | {'write_hparams', 'flush'}

  def __init__(self, writer, logdir: str, created: set[str]):
    self._writer = writer
    # the file TensorFlow's writer made when it was created (else its folder)
    self.path = max(created, default=logdir)

  def __getattr__(self, name):
    method = getattr(self._writer, name)
    if name not in self._WRITES:
      return method

    def hooked(*args, **kwargs):
      import tensorflow as tf  # imported by clu already

      try:
        faults.check('events', self.path)
        return method(*args, **kwargs)
      except (OSError, tf.errors.OpError) as e:
        raise errors.WriteFailed(self.path, e) from e

    return hooked

  def close(self) -> None:
    self.flush()
    self._writer.close()


def create_writer(
    workdir: str, *, just_logging: bool = False, kind: str = 'events'
) -> tuple[object, str]:
  """(writer, logdir): an EventWriter on a local workdir, a MirroredWriter on object storage;
  logdir is where the profiler writes traces (which flush() then brings to the workdir).
  kind='clu': clu's default writer (logging, and TensorFlow's summary writer, which writes to
  the workdir itself, gs:// too); TensorFlow is imported then and only then."""
  if kind == 'clu':
    from clu import metric_writers  # imports TensorFlow

    before = set() if just_logging else _event_files(workdir)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=just_logging, asynchronous=False
    )
    if just_logging:
      return writer, workdir
    return HookedCluWriter(writer, workdir, _event_files(workdir) - before), workdir
  if kind != 'events':
    raise ValueError(f"metric writer kind must be 'events' or 'clu', got {kind!r}")
  if paths.is_remote(workdir):
    writer = MirroredWriter(workdir, just_logging=just_logging)
    return writer, writer.local
  return EventWriter(workdir, just_logging=just_logging), workdir


class ProfileWindow:
  """One profiler trace (jax.profiler) under ``logdir`` of the ``steps`` steps after step
  ``after``. Called with each step number once that step was dispatched: the trace starts after
  step ``after`` and stops after step ``after + steps``; ``close()`` ends a trace the run did not
  reach the end of (clu's Profile, which this replaces, would leave it open)."""

  def __init__(self, logdir: str, *, after: int, steps: int):
    self.logdir, self.after, self.steps = logdir, after, steps
    self.active = False

  def __call__(self, step: int) -> None:
    if self.steps <= 0:
      return
    if step == self.after and not self.active:
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info('profiling steps %d to %d into %s', step + 1, step + self.steps, self.logdir)
    elif self.active and step >= self.after + self.steps:
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
