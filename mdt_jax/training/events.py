"""TensorBoard event files written without TensorFlow.

A training run logs scalars and sample grids to TensorBoard. clu's writer does that through
TensorFlow, whose import (with the Keras it pulls in) took 6-7 s of every training start on the
development machine (BENCHMARKS.md, "The test suite"). TensorBoard itself ships what a writer
needs: the event and summary protocol buffers, the summary metadata of its scalar and image
plugins, and the record framing of an event file. This module puts them together the way
`tf.summary.scalar` / `tf.summary.image` (TF 2) write, so TensorBoard and its event loaders read
the files as they read TensorFlow's.

`EventWriter` has the method set of clu's ``MetricWriter`` (clu.metric_writers.interface), so the
loop writes through either (``config.metric_writer``: 'events', this one; 'clu', clu's default
writer, which imports TensorFlow). Texts, histograms and hyperparameters are TensorBoard's own
summary protos (its text, histogram and hparams plugins' ``*_pb`` functions, which need no
TensorFlow); videos and audio are logged only, as by clu's LoggingWriter.

Every write is also logged, as clu's LoggingWriter does (``[step] name=value, ...``).
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from typing import Any, Iterator, Mapping

import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from mdt_jax import errors, faults

_FILE_VERSION = 'brain.Event:2'
_serial = itertools.count()


def event_file_name() -> str:
  """TensorFlow's naming: events.out.tfevents.<seconds>.<host>.<pid>.<serial>.v2 (TensorBoard
  finds event files by the ``tfevents`` part; a resumed run adds a file)."""
  return (
      f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
      f'{next(_serial)}.v2'
  )


def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  """A float32 scalar under the scalars plugin (what tf.summary.scalar writes)."""
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(), float_val=[value]
  )
  meta = scalar_metadata.create_summary_metadata(display_name=tag, description='')
  return summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)


def image_value(tag: str, images: np.ndarray) -> summary_pb2.Summary.Value:
  """uint8 [N, H, W, C] or [H, W, C] (C 1, 3 or 4) under the images plugin: a string tensor of width,
  height and one PNG per image (what tf.summary.image writes)."""
  from PIL import Image

  images = np.asarray(images)
  if images.ndim not in (3, 4) or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
    raise ValueError(
        f'image summary {tag!r}: expected uint8 [N, H, W, C] or [H, W, C] with C in (1, 3, 4), '
        f'got {images.dtype} {images.shape}'
    )
  if images.ndim == 3:
    images = images[None]
  encoded = []
  for img in images:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format='PNG')
    encoded.append(buf.getvalue())
  n, h, w, _ = images.shape
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_STRING,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2 + n)]
      ),
      string_val=[str(w).encode(), str(h).encode(), *encoded],
  )
  meta = image_metadata.create_summary_metadata(display_name=tag, description='')
  return summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor)


def flat_hparams(hparams: Mapping[str, Any], prefix: str = '') -> Iterator[tuple[str, Any]]:
  """(dotted name, value) of nested mappings (and ConfigDicts), as clu's writers flatten
  hyperparameters: list items by index, None as ''; values other than bool, int, float and str
  as their str()."""
  for key, value in hparams.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) or hasattr(value, 'items'):
      yield from flat_hparams(value, name + '.')
    elif isinstance(value, (list, tuple)):
      yield from flat_hparams({str(i): v for i, v in enumerate(value)}, name + '.')
    elif value is None:
      yield name, ''
    elif isinstance(value, (bool, int, float, str, np.generic)):
      yield name, value.item() if isinstance(value, np.generic) else value
    else:
      yield name, str(value)


class EventWriter:
  """clu's MetricWriter methods over one TensorBoard event file in ``logdir``;
  ``just_logging``: log only (the processes of a multi-host run other than the first)."""

  def __init__(self, logdir: str, *, just_logging: bool = False):
    self.path = None
    self._records = None
    if not just_logging:
      os.makedirs(logdir, exist_ok=True)
      self.path = os.path.join(logdir, event_file_name())
      self._records = RecordWriter(open(self.path, 'wb'))
      self._write(event_pb2.Event(wall_time=time.time(), file_version=_FILE_VERSION))
      self.flush()

  def _write(self, event: event_pb2.Event) -> None:
    if self._records is not None:
      try:
        faults.check('events', self.path)
        self._records.write(event.SerializeToString())
      except OSError as e:
        raise errors.WriteFailed(self.path, e) from e

  def _summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    summary = summary_pb2.Summary(value=values)
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_summaries(
      self,
      step: int,
      values: Mapping[str, Any],
      metadata: Mapping[str, summary_pb2.SummaryMetadata] | None = None,
  ) -> None:
    """Tensors with the summary metadata given per tag (none: a plain tensor summary)."""
    logging.info('[%d] summaries: %s', step, {k: np.shape(v) for k, v in values.items()})
    out = []
    for tag, value in values.items():
      meta = (metadata or {}).get(tag) or summary_pb2.SummaryMetadata()
      tensor = tensor_util.make_tensor_proto(np.asarray(value))
      out.append(summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor))
    self._summary(step, out)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    floats = {k: float(np.asarray(v)) for k, v in scalars.items()}
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in floats.items()))
    self._summary(step, [scalar_value(k, v) for k, v in floats.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 images [N, H, W, C] or one [H, W, C] per tag."""
    logging.info('[%d] images: %s', step, {k: np.shape(v) for k, v in images.items()})
    if self._records is not None:
      self._summary(step, [image_value(k, v) for k, v in images.items()])

  def write_videos(self, step: int, videos: Mapping[str, np.ndarray]) -> None:
    logging.warning(
        '[%d] videos %s: not written (TensorBoard has no video summary)', step, list(videos)
    )

  def write_audios(self, step: int, audios: Mapping[str, np.ndarray], *, sample_rate: int) -> None:
    logging.warning('[%d] audios %s at %d Hz: logged only', step, list(audios), sample_rate)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Markdown texts (TensorBoard's Text tab)."""
    logging.info('[%d] texts: %s', step, list(texts))
    for tag, text in texts.items():
      self._summary(step, list(text_summary.text_pb(tag, text).value))

  def write_histograms(
      self,
      step: int,
      arrays: Mapping[str, np.ndarray],
      num_buckets: Mapping[str, int] | None = None,
  ) -> None:
    """Histograms of the arrays' values (30 buckets unless `num_buckets` says otherwise)."""
    logging.info('[%d] histograms: %s', step, {k: np.shape(v) for k, v in arrays.items()})
    for tag, array in arrays.items():
      buckets = (num_buckets or {}).get(tag)
      pb = histogram_summary.histogram_pb(tag, np.asarray(array, np.float64), buckets=buckets)
      self._summary(step, list(pb.value))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's hyperparameters (TensorBoard's HParams tab), flattened as `flat_hparams`."""
    flat = dict(flat_hparams(hparams))
    logging.info('hparams: %s', flat)
    self._summary(0, list(hparams_summary.hparams_pb(flat).value))

  def flush(self) -> None:
    if self._records is not None:
      try:
        self._records.flush()
      except OSError as e:
        raise errors.WriteFailed(self.path, e) from e

  def close(self) -> None:
    if self._records is not None and not self._records.closed:
      self._records.close()
