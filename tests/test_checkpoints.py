"""How a save writes arrays replicated over the 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from micro_config import get_config
from mdt_jax.training import checkpoints, sharding
from mdt_jax.training.state import create_train_state, make_optimizer
from mdt_jax.models.mdt import MDTConfig


class _Iterator:
  """The data iterator's side of a save: a position."""

  def get_state(self):
    return {'position': 5}


@pytest.fixture
def slices(monkeypatch):
  """Counts the eager slicing ops orbax runs (replica-parallel writing cuts arrays with them)."""
  calls = []
  original = jax.lax.slice_in_dim

  def counting(*a, **k):
    calls.append(a[0].shape)
    return original(*a, **k)

  monkeypatch.setattr(jax.lax, 'slice_in_dim', counting)
  return calls


def test_a_save_slices_only_replicated_arrays_worth_sharing_out(tmp_path, slices):
  config = get_config()
  mesh = sharding.make_mesh(config.mesh.to_dict())
  state, _, _ = create_train_state(
      MDTConfig.from_dict(config.model.to_dict()),
      make_optimizer(config.optimizer),
      config.seed,
      mesh,
      config.sharding_rules,
  )
  replicated = [x for x in jax.tree.leaves(state.params) if x.sharding.is_fully_replicated]
  assert len(replicated) > 10 and jax.device_count() == 8
  own = ocp.type_handlers.get_type_handler(jax.Array)
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'w'), keep=2)  # asynchronous, the default
  ckpt.save(state, _Iterator(), 1)
  ckpt.close()
  assert slices == []  # the micro model's arrays are all far below 1 MiB a slice
  # orbax's own handler is back for everything else in the process
  assert ocp.type_handlers.get_type_handler(jax.Array) is own
  # ... and it is what the check above would have caught: it slices even these
  replicate = NamedSharding(mesh, PartitionSpec())
  small = jax.device_put(jnp.ones((8, 4)), replicate)
  ocp.StandardCheckpointer().save(tmp_path / 'orbax', {'w': small})
  assert slices, 'orbax no longer slices small replicated arrays'
  # an array of 1 MiB a device is still written in slices, one per device
  slices.clear()
  big = jax.device_put(jnp.ones((8, checkpoints.MIN_REPLICA_SLICE_BYTES // 4)), replicate)
  with checkpoints._array_writes():
    ocp.StandardCheckpointer().save(tmp_path / 'big', {'big': big, 'small': small})
  assert slices == [big.shape] * 8, slices[:10]
  # the checkpoint holds the state
  restored = checkpoints.Checkpointer(str(tmp_path / 'w'), keep=2).manager.restore(
      1, args=ocp.args.Composite(params=ocp.args.StandardRestore())
  )['params']
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
