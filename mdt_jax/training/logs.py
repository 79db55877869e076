"""Logging set-up shared by the command-line entry points."""

from __future__ import annotations

import logging as pylogging

from absl import logging


class _QuietOrbax:
  """orbax logs every file it writes or renames at INFO; keep its warnings and errors only."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or 'orbax' not in record.pathname


def quiet_orbax() -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
