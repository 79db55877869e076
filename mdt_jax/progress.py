"""Progress of a known amount of work (images sampled, encoded, scored; tensors converted).

At a terminal a tqdm bar with the rate and the time left; in a log (stderr not a terminal) one
line each time another ``every_percent`` of the work is done, and one at the end:

    sampling: 5000/50000 images (10%), 12.3 images/s, 1:01:02 left

Work found already done (a resumed run's finished shards) is counted with ``skip``: it moves the
bar but not the rate, so the time left is the time the remaining work takes at this run's speed.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
  """A bar or log lines over ``total`` units; use as a context manager, or call ``close``.

  ``interactive``: a bar (True) or log lines (False); by default a bar when ``stream`` (stderr)
  is a terminal. ``enabled=False`` writes nothing (the other hosts of a multi-host run).
  """

  def __init__(
      self,
      total: int,
      desc: str,
      unit: str = 'images',
      *,
      every_percent: float = 10.0,
      stream: TextIO | None = None,
      interactive: bool | None = None,
      enabled: bool = True,
  ):
    if total < 0:
      raise ValueError(f'progress total must be >= 0, got {total}')
    if not 0 < every_percent <= 100:
      raise ValueError(f'every_percent must be in (0, 100], got {every_percent}')
    self.total, self.desc, self.unit = total, desc, unit
    self.stream = stream if stream is not None else sys.stderr
    if interactive is None:
      interactive = bool(getattr(self.stream, 'isatty', lambda: False)())
    self.interactive = interactive
    self.every = every_percent
    self.done = 0  # units done, skipped ones included
    self.worked = 0  # units done by this run: what the rate counts
    self.start = time.monotonic()
    self._next_line = every_percent  # the next percentage that writes a log line
    self._closed = not enabled  # a disabled one writes nothing (e.g. on all but one host)
    self._bar = None
    if interactive and enabled:
      self._bar = tqdm(total=total, desc=desc, unit=f' {unit}', file=self.stream, leave=True)

  def update(self, n: int = 1) -> None:
    """``n`` more units done by this run."""
    self.done += n
    self.worked += n
    if self._bar is not None:
      self._bar.update(n)
    elif not self._closed:
      self._maybe_line()

  def skip(self, n: int) -> None:
    """``n`` units found already done: counted as done, not in the rate."""
    self.done += n
    if self._bar is not None:
      self._bar.n += n
      self._bar.initial += n  # tqdm's average rate counts from `initial`
      self._bar.refresh()
    elif not self._closed:
      self._maybe_line()

  def rate(self) -> float:
    """Units per second done by this run so far."""
    seconds = time.monotonic() - self.start
    return self.worked / seconds if seconds > 0 else 0.0

  def line(self) -> str:
    """The log line for the progress so far."""
    pct = 100.0 * self.done / self.total if self.total else 100.0
    rate = self.rate()
    left = self.total - self.done
    if left <= 0:
      eta = 'done'
    elif rate > 0:
      eta = f'{tqdm.format_interval(left / rate)} left'
    else:
      eta = 'time left unknown'
    return (
        f'{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), '
        f'{rate:.3g} {self.unit}/s, {eta}'
    )

  def _maybe_line(self) -> None:
    pct = 100.0 * self.done / self.total if self.total else 100.0
    if pct + 1e-9 < self._next_line:
      return
    while self._next_line <= pct + 1e-9:
      self._next_line += self.every
    print(self.line(), file=self.stream, flush=True)
    if self.done >= self.total:
      self._closed = True  # the 100% line is the last one

  def close(self) -> None:
    """Ends the bar; in a log, writes the last line unless the 100% line was written."""
    if self._bar is not None:
      self._bar.close()
    elif not self._closed:
      print(self.line(), file=self.stream, flush=True)
    self._closed = True

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
