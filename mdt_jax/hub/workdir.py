"""Loading a training workdir's weights as a model (``load_workdir``): the EMA (or raw) parameters
of one checkpoint, with the model-folder metadata its training config implies."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mdt_jax import paths
from mdt_jax.diffusion import folder_record, objective_of
from mdt_jax.hub.folder import Pretrained
from mdt_jax.configs_base import model_of
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.params import abstract_model, model_from_flat, param_name
from mdt_jax.sampling.postprocess import ModelData
from mdt_jax.training import checkpoints


def is_workdir(path: str) -> bool:
  return (paths.path(path) / checkpoints.CHECKPOINT_DIR).is_dir()


def load_workdir(
    workdir: str,
    step: int | None = None,
    weights: str = 'ema_params',
    *,
    train_config: ml_collections.ConfigDict | None = None,
    **model_overrides,
) -> Pretrained:
  """The model with the EMA (or raw) weights of the latest (or given) checkpoint of a workdir.

  `train_config` is the workdir's training config when the caller has read it already.
  """
  if weights not in ('ema_params', 'params'):
    raise ValueError(f"weights must be 'ema_params' or 'params', got {weights!r}")
  config = checkpoints.read_train_config(workdir) if train_config is None else train_config
  model_cfg = model_of(config.model.to_dict(), **model_overrides)
  manager = ocp.CheckpointManager(
      epath.Path(paths.resolve(workdir)) / checkpoints.CHECKPOINT_DIR,
      item_handlers={weights: ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True),
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint yet')
  if step not in manager.all_steps():
    raise FileNotFoundError(
        f'{workdir} has no checkpoint at step {step}; it has steps {manager.all_steps()}'
    )
  # a run with representation alignment saved its projector: restored, then left out
  abstract = nnx.to_pure_dict(nnx.state(abstract_model(_with_projector(manager, step, model_cfg))))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(**{weights: ocp.args.StandardRestore(target)})
    )[weights]
  except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise many types
    where = f'{weights} of the checkpoint at step {step} in {workdir}'
    mismatch = checkpoints.saved_mismatch(manager, step, {weights: target})
    if mismatch:
      raise ValueError(f'{where} do not match the model config: {mismatch}') from e
    raise checkpoints.damaged_error(
        where, manager.directory, step, manager.all_steps(), e, loading=True
    ) from e
  finally:
    manager.close()
  flat = {
      param_name(path): jax.device_get(v)
      for path, v in jax.tree_util.tree_flatten_with_path(restored)[0]
      if param_name(path[:1]) != 'projector'
  }
  model = model_from_flat(flat, model_cfg, where=f'{workdir} step {step}')
  return Pretrained(
      model=model,
      config=model_cfg,
      objective=objective_of(config.diffusion),
      data=model_data(config),
      diffusion=folder_record(config.diffusion),
      sampling=dict(config.sampling.to_dict()) if 'sampling' in config else {},
      meta={'workdir': workdir, 'step': int(step), 'weights': weights},
  )


def _with_projector(manager: ocp.CheckpointManager, step: int, model_cfg: MDTConfig) -> MDTConfig:
  """The model config with the projector the checkpoint holds (its widths from the saved
  shapes), or unchanged."""
  try:
    saved = manager.item_metadata(step)
    saved = next(saved[k] for k in ('ema_params', 'params') if k in saved.keys() and saved[k])
  except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports the damage
    return model_cfg
  projector = saved.get('projector') if hasattr(saved, 'get') else None
  if not projector:
    return model_cfg
  return dataclasses.replace(
      model_cfg,
      align_dim=int(projector['fc3']['kernel'].shape[1]),
      projector_dim=int(projector['fc1']['kernel'].shape[1]),
  )


def model_data(config: ml_collections.ConfigDict) -> ModelData:
  """What the model of a training config generates (its folder's `data` section)."""
  d = config.data
  if d.name == 'digits':
    return ModelData(space='pixel', image_size=d.image_size, image_channels=1, vae=None)
  return ModelData(space='latent', image_size=d.image_size, image_channels=3, vae=d.get('vae'))
