"""Checkpoints of a training workdir (orbax CheckpointManager) and loading its EMA weights.

Layout of a workdir::

    config.json                 the training config (model section checked on resume)
    checkpoints/<step>/         params, ema_params, opt_state, meta (step, rng), data (grain
                                iterator state, one file per process)
    tensorboard events, samples/

Each item is saved separately so that ``load_workdir`` reads only the EMA weights.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mdt_jax import paths
from mdt_jax.diffusion import folder_record, objective_of
from mdt_jax.hub.folder import Pretrained, model_from_flat
from mdt_jax.models.mdt import COMPUTE_OPTIONS, MDTConfig
from mdt_jax.training.state import TrainState, abstract_model

CONFIG_FILE = 'config.json'
ITEMS = ('params', 'ema_params', 'opt_state', 'meta')


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class _Position:
  """The data iterator's position when save() is called: an async save may write it later,
  after the loop has read on. Written as the same JSON text as a grain iterator's."""

  def __init__(self, data_iter):
    state = data_iter.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Save and restore the train state and the data-iterator state together."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    # orbax refuses relative paths
    self.directory = epath.Path(paths.resolve(workdir)) / 'checkpoints'
    handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
    handlers['data'] = grain.checkpoint.CheckpointHandler()
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_iter, step: int) -> None:
    args = {k: ocp.args.StandardSave(v) for k, v in self._items(state).items()}
    args['data'] = grain.checkpoint.CheckpointSave(_Position(data_iter))
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, abstract_state: TrainState, shardings: TrainState, data_iter,
              step: int | None = None) -> TrainState:
    step = self.latest_step() if step is None else step
    target = _abstract(abstract_state, shardings)
    args = {k: ocp.args.StandardRestore(v) for k, v in self._items(target).items()}
    args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except ValueError as e:
      raise ValueError(f'checkpoint at step {step} in {self.directory} does not match this '
                       f'config\'s train state (model or optimizer changed?): {e}') from e
    return TrainState(step=out['meta']['step'], rng=out['meta']['rng'], params=out['params'],
                      ema_params=out['ema_params'], opt_state=out['opt_state'])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  @staticmethod
  def _items(state: TrainState) -> dict[str, Any]:
    return {'params': state.params, 'ema_params': state.ema_params,
            'opt_state': state.opt_state, 'meta': {'step': state.step, 'rng': state.rng}}


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuse a workdir that holds a run of another model shape."""
  path = epath.Path(workdir) / CONFIG_FILE
  if path.exists():
    old = json.loads(path.read_text())
    new_model = MDTConfig.from_dict(config.model.to_dict())
    old_model = MDTConfig.from_dict(old['model'])
    shape_keys = [k for k in new_model.to_dict()
                  if k not in COMPUTE_OPTIONS and
                  k not in ('class_dropout_prob', 'mask_ratio', 'mask_ratio_span')]
    diffs = [f'{k}: workdir {old_model.to_dict()[k]!r} vs config {new_model.to_dict()[k]!r}'
             for k in shape_keys if old_model.to_dict()[k] != new_model.to_dict()[k]]
    old_objective = objective_of(old.get('diffusion'))
    if old_objective != objective_of(config.diffusion):
      diffs.append(f'diffusion.objective: workdir {old_objective!r} vs config '
                   f'{objective_of(config.diffusion)!r}')
    if diffs:
      raise ValueError(f'workdir {workdir} holds a run of another model shape ('
                       + '; '.join(diffs) + '); use a new workdir')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Record the config of the run (after a successful resume, so a refused one leaves it)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{workdir} has no {CONFIG_FILE}: not a training workdir')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_workdir(workdir: str, step: int | None = None, weights: str = 'ema_params',
                 **model_overrides) -> Pretrained:
  """The model with the EMA (or raw) weights of the latest (or given) checkpoint of a workdir."""
  if weights not in ('ema_params', 'params'):
    raise ValueError(f"weights must be 'ema_params' or 'params', got {weights!r}")
  config = read_config(workdir)
  model_cfg = MDTConfig.from_dict({**config.model.to_dict(), **model_overrides})
  manager = ocp.CheckpointManager(epath.Path(paths.resolve(workdir)) / 'checkpoints',
                                  item_handlers={weights: ocp.StandardCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint yet')
  abstract = nnx.to_pure_dict(nnx.state(abstract_model(model_cfg)))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  restored = manager.restore(step, args=ocp.args.Composite(
      **{weights: ocp.args.StandardRestore(target)}))[weights]
  manager.close()
  flat = {'.'.join(str(k.key) for k in path): jax.device_get(v)
          for path, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
  model = model_from_flat(flat, model_cfg, where=f'{workdir} step {step}')
  return Pretrained(model=model, config=model_cfg, data=data_meta(config),
                    diffusion=folder_record(config.diffusion),
                    sampling=dict(config.sampling.to_dict()) if 'sampling' in config else {},
                    meta={'workdir': workdir, 'step': int(step), 'weights': weights})


def data_meta(config: ml_collections.ConfigDict) -> dict:
  """The model folder's `data` section for a training config."""
  d = config.data
  if d.name == 'digits':
    return dict(space='pixel', image_size=d.image_size, image_channels=1, vae=None)
  return dict(space='latent', image_size=d.image_size, image_channels=3, latent_scale=0.18215,
              vae=d.get('vae_decoder', None))
