"""The metric writer of a workdir: TensorBoard events (and profiler traces) in the workdir.

clu's writer writes events through TensorFlow's file layer and the profiler through its own; on a
gs:// workdir neither goes through the project's file layer (TensorFlow's GCS client cannot be
pointed at anything but Google's endpoint). So for object storage both write into a local
staging folder, and every ``flush()`` copies the files that changed to the workdir whole (an
event file grows; an object cannot be appended to, so it is uploaded again, as TensorFlow's own
GCS writer does on every flush).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from clu import metric_writers

from mdt_jax import paths
from mdt_jax.atomic import atomic_file

_CHUNK = 16 << 20


class MirroredWriter:
  """A clu metric writer over a local staging folder, mirrored into ``workdir`` on flush()."""

  def __init__(self, workdir: str, *, just_logging: bool = False):
    self.workdir = workdir
    self.local = tempfile.mkdtemp(prefix='mdt_jax-tensorboard-')
    self._inner = metric_writers.create_default_writer(self.local, just_logging=just_logging)
    self._sent: dict[str, tuple[int, int]] = {}

  def __getattr__(self, name):  # write_scalars, write_images, ...: clu's writer
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


def create_writer(workdir: str, *, just_logging: bool = False) -> tuple[object, str]:
  """(writer, logdir): clu's default writer on a local workdir, a MirroredWriter on object
  storage; logdir is where the profiler writes traces (which flush() then brings to the
  workdir)."""
  if paths.is_remote(workdir):
    writer = MirroredWriter(workdir, just_logging=just_logging)
    return writer, writer.local
  return metric_writers.create_default_writer(workdir, just_logging=just_logging), workdir
