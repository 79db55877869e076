"""Reading back what a run wrote to TensorBoard (the event files in its workdir)."""

from __future__ import annotations

import collections
import os

import numpy as np


def read_events(workdir: str) -> dict[str, dict[int, list]]:
  """{tag: {step: [values]}} from every event file of a workdir (a resumed run adds a file):
  scalars as floats, images as their encoded bytes, texts as str, histograms as [k, 3] arrays
  (left edge, right edge, count), hyperparameters (tag HPARAMS) as a {name: value} dict."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util

  out = collections.defaultdict(lambda: collections.defaultdict(list))
  files = sorted(f for f in os.listdir(workdir) if f.startswith('events.out.tfevents'))
  assert files, f'no TensorBoard event file in {workdir}'
  for name in files:
    for event in event_file_loader.EventFileLoader(os.path.join(workdir, name)).Load():
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        value = tensor_util.make_ndarray(v.tensor)
        if plugin == 'scalars':
          value = float(np.asarray(value))
        elif plugin == 'text':
          value = np.asarray(value).item().decode()
        elif plugin == 'hparams':
          value = _hparams(v.metadata.plugin_data.content)
        out[v.tag][int(event.step)].append(value)
  return out


HPARAMS = '_hparams_/session_start_info'


def _hparams(content: bytes) -> dict:
  from google.protobuf import json_format
  from tensorboard.plugins.hparams import metadata

  info = metadata.parse_session_start_info_plugin_data(content)
  return {k: json_format.MessageToDict(v) for k, v in info.hparams.items()}


def scalar(events: dict, tag: str, step: int) -> float:
  """The one value of a scalar at a step."""
  values = events[tag].get(step)
  assert values and len(values) == 1, f'{tag} at step {step}: {values}'
  return values[0]
