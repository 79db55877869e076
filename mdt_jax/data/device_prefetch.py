"""Batches copied to the devices ahead of the train step, with an exact checkpoint position.

The copy of batch n+1 is issued while step n runs, so the step never waits for a host-to-device
transfer. A checkpoint must record where the *loop* is, not the reader, which is ahead by the
batches in flight: the state saved is the reader's state from before the first batch the loop has
not taken yet, so a resumed run reads exactly the batches an uninterrupted one would.

The object is what `grain.checkpoint.CheckpointHandler` saves and restores (get_state/set_state
with the reader's JSON state as bytes; the file holds the same JSON as a bare grain iterator's).
"""

from __future__ import annotations

import collections
import json
from typing import Callable, Iterator


class DevicePrefetch:
  """Iterate `it` with `size` batches already placed by `place` (e.g. pipeline.to_global)."""

  def __init__(self, it: Iterator, place: Callable, size: int = 2):
    if size < 0:
      raise ValueError(f'data.device_prefetch must be >= 0 batches, got {size}')
    self._it, self._place, self._size = it, place, size
    self._queue: collections.deque = collections.deque()  # (reader state before, placed batch)

  def _fill(self, n: int) -> None:
    while len(self._queue) < n:
      before = self._it.get_state()
      self._queue.append((before, self._place(next(self._it))))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill(1)
    _, batch = self._queue.popleft()
    self._fill(self._size)  # the next copies start now, behind this batch's step
    return batch

  def get_state(self) -> bytes:
    state = self._queue[0][0] if self._queue else self._it.get_state()
    return json.dumps(state, indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self._queue.clear()  # batches read past the restored position are dropped
    self._it.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; the queue refills on next()."""
