"""Batches placed on the devices ahead of the step; checkpoints hold the loop's position."""

import json

import jax
import numpy as np
import pytest

from micro_config import get_config
from mdt_jax.data import pipeline
from mdt_jax.data.device_prefetch import DevicePrefetch
from mdt_jax.training import sharding


def _reader():
  return pipeline.make_iterator(get_config().data, seed=3, global_batch=8)


def _placed(size):
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  bsh = sharding.batch_sharding(mesh)
  return DevicePrefetch(_reader(), lambda b: pipeline.to_global(b, bsh), size), bsh


def _host(batch):
  return {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}


@pytest.mark.parametrize('size', [0, 2])
def test_same_batches_as_the_reader_and_resume_at_the_loop_position(size):
  reader = _reader()
  want = [next(reader) for _ in range(6)]
  it, bsh = _placed(size)
  got = [next(it) for _ in range(3)]
  assert all(isinstance(v, jax.Array) and v.sharding == bsh for v in got[0].values())
  saved = it.get_state()  # the reader is `size` batches further on
  got += [next(it) for _ in range(3)]
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_array_equal(_host(g)[k], w[k])
  resumed, _ = _placed(size)
  resumed.set_state(saved)
  resumed.start_prefetch()
  for w in want[3:]:
    np.testing.assert_array_equal(_host(next(resumed))['x'], w['x'])


def test_state_file_is_a_bare_readers_json():
  reader = _reader()
  next(reader)
  it, _ = _placed(2)
  next(it)
  assert json.loads(it.get_state()) == reader.get_state()
  with pytest.raises(ValueError, match='data.device_prefetch must be >= 0 batches, got -1'):
    DevicePrefetch(reader, lambda b: b, -1)
