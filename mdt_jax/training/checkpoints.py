"""Checkpoints of a training workdir (orbax CheckpointManager) and loading its EMA weights.

Layout of a workdir::

    config.json                 the training config (model section checked on resume)
    checkpoints/<step>/         params, ema_params, opt_state, meta (step, rng), data (grain
                                iterator state, one file per process)
    tensorboard events, samples/

Each item is saved separately so that ``mdt_jax.hub.workdir.load_workdir`` reads only the EMA
weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mdt_jax import atomic, errors, faults, paths
from mdt_jax.configs_base import model_of, upgrade
from mdt_jax.compat.orbax import ArrayMetadataStore
from mdt_jax.diffusion import objective_of
from mdt_jax.models.mdt import COMPUTE, COMPUTE_OPTIONS, TRAINING, MDTConfig, field_names
from mdt_jax.models.params import leaf_shapes, param_shapes
from mdt_jax.training import align
from mdt_jax.training.run import RunConfig
from mdt_jax.training.state import TrainState

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
ITEMS = ('params', 'ema_params', 'opt_state', 'meta')


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


class _Position:
  """The data iterator's position when save() is called: an async save may write it later,
  after the loop has read on. Written as the same JSON text as a grain iterator's."""

  def __init__(self, data_iter):
    state = data_iter.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (one position file per process), which also resumes on another process
  count. Process p of P reads every P-th per-process batch of one global stream, so after s steps
  every process's position is the same (s batches read) and the global batch of step s is the
  same for any P: a position written by any process is then right for every process now."""

  def save(self, directory: epath.Path, item=None, args=None):
    where = os.fspath(directory)
    try:
      faults.check('data_position', where)
      super().save(directory, item, args)
    except OSError as e:
      raise errors.WriteFailed(where, e) from e

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    own = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    names = (
        [own]
        if (directory / own).exists()
        else sorted(f.name for f in directory.glob('process_*-of-*.json'))
    )
    if not names:
      raise FileNotFoundError(f'{directory} holds no data-iterator position (process_*-of-*.json)')
    states = {n: _read_position(directory / n) for n in names}
    first = states[names[0]]
    if any(s != first for s in states.values()):
      raise ValueError(
          f'{directory}: the data positions of the processes that wrote this '
          f'checkpoint differ ({states}); it cannot resume on '
          f'{jax.process_count()} process(es)'
      )
    if names != [own]:
      logging.warning(
          'data position written by %d process(es), resumed by %d: %s',
          len(names),
          jax.process_count(),
          first,
      )
    item.set_state(
        first if isinstance(item, grain.DatasetIterator) else json.dumps(first, indent=4).encode()
    )
    item.start_prefetch()
    return item


def _read_position(path: epath.Path) -> dict:
  text = path.read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(
        f'data position {path} is not the JSON a save writes ({len(text)} characters: {e})'
    ) from e


# Replica-parallel writing (orbax's default on TPU and CPU) lets the devices, and so the hosts,
# that hold copies of a replicated array write a slice each, and cuts each slice with an eager
# op on the save's blocking path. A slice smaller than this is written whole by one replica: the
# op (dispatch, and a compile per shape and device on first use: 1.7 ms a slice measured on the
# CPU, BENCHMARKS.md "Checkpoints") costs more than writing the bytes it would share out.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class _FaultPoint:
  """A commit future of an array item's save that passes the fault hook when orbax's background
  commit waits on it: after the item's arrays are written, before the step folder is renamed
  into place (mdt_jax.faults, site 'checkpoint')."""

  def __init__(self, where: str):
    self.where, self.passed = where, False

  def result(self, timeout=None) -> None:
    del timeout
    if self.passed:  # orbax may wait on a commit more than once: one write, one check
      return
    self.passed = True
    try:
      faults.check('checkpoint', self.where)
    except OSError as e:
      raise errors.WriteFailed(self.where, e) from e


class _ArrayHandler(ocp.type_handlers.ArrayHandler):
  """orbax's jax.Array handler, its commits passing the fault hook (``_FaultPoint``)."""

  async def serialize(self, values, infos, args=None):
    commits = list(await super().serialize(values, infos, args))
    return [*commits, _FaultPoint(os.fspath(infos[0].parent_dir))] if infos else commits


@contextlib.contextmanager
def _array_writes():
  """orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES, for the saves in this block
  (orbax's own handler again after it). Without it a save of the tests' micro model on 8
  devices cut every array: thousands of ops."""
  own = ocp.type_handlers.get_type_handler(jax.Array)
  handler = _ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
      array_metadata_store=ArrayMetadataStore(),
  )
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  try:
    yield
  finally:
    ocp.type_handlers.register_type_handler(jax.Array, own, override=True)


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Save and restore the train state and the data-iterator state together."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    # orbax refuses relative paths
    self.directory = epath.Path(paths.resolve(workdir)) / CHECKPOINT_DIR
    handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
    handlers['data'] = _DataHandler()
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_iter, step: int) -> None:
    args = {k: ocp.args.StandardSave(v) for k, v in self._items(state).items()}
    args['data'] = _DataSave(_Position(data_iter))
    with _array_writes():  # the arrays are read to the host before save() returns
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(
      self, abstract_state: TrainState, shardings: TrainState, data_iter, step: int | None = None
  ) -> TrainState:
    step = self.latest_step() if step is None else step
    target = _abstract(abstract_state, shardings)
    args = {k: ocp.args.StandardRestore(v) for k, v in self._items(target).items()}
    args['data'] = _DataRestore(data_iter)
    self._require_items(step)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - orbax, TensorStore and json raise many types
      error = self._restore_error(step, target, e)
      self.close()
      raise error from e
    return TrainState(
        step=out['meta']['step'],
        rng=out['meta']['rng'],
        params=out['params'],
        ema_params=out['ema_params'],
        opt_state=out['opt_state'],
    )

  def _require_items(self, step: int) -> None:
    """Refuse a checkpoint folder that lacks an item, naming it, before orbax reads any."""
    folder = self.directory / str(step)
    missing = [k for k in (*ITEMS, 'data') if not (folder / k).is_dir()]
    if missing:
      self.close()
      raise damaged_error(
          f'checkpoint at step {step} in {self.directory}',
          self.directory,
          step,
          self.manager.all_steps(),
          FileNotFoundError(
              f'{folder} has no {", ".join(missing)} (a checkpoint holds '
              f'{", ".join((*ITEMS, "data"))})'
          ),
      )

  def _restore_error(self, step: int, target: TrainState, error: Exception) -> ValueError:
    """Another train state (config changed) or a damaged checkpoint, told apart by comparing the
    saved arrays' names and shapes with the config's."""
    where = f'checkpoint at step {step} in {self.directory}'
    mismatch = saved_mismatch(self.manager, step, self._items(target))
    if mismatch:
      return ValueError(
          f"{where} does not match this config's train state (model or optimizer "
          f'changed?): {mismatch}'
      )
    return damaged_error(where, self.directory, step, self.manager.all_steps(), error)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  @staticmethod
  def _items(state: TrainState) -> dict[str, Any]:
    return {
        'params': state.params,
        'ema_params': state.ema_params,
        'opt_state': state.opt_state,
        'meta': {'step': state.step, 'rng': state.rng},
    }


# Model fields a resumed run may change: how the model is computed and the training-time
# regularisers (their role in MDTConfig). A change of one of them that changes a parameter's shape
# (class_dropout_prob 0 <-> > 0 adds or removes the label table's null row) is still refused:
# check_workdir compares the parameter shapes themselves.
RESUMABLE_FIELDS = field_names(COMPUTE, TRAINING)


def shape_changes(old: MDTConfig, new: MDTConfig) -> list[str]:
  """'name: workdir SHAPE vs config SHAPE' for every parameter whose shape (or presence) differs."""
  a, b = param_shapes(old), param_shapes(new)
  missing = '(absent)'
  return [
      f'{k}: workdir {a.get(k, missing)} vs config {b.get(k, missing)}'
      for k in sorted(a.keys() | b.keys())
      if a.get(k) != b.get(k)
  ]


def saved_mismatch(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> str:
  """The items whose saved arrays (names, shapes) differ from ``items``: '' when all agree or
  when the saved metadata cannot be read (the checkpoint is then damaged rather than foreign)."""
  try:
    meta = manager.item_metadata(step)
    saved = {k: meta[k] for k in items if k in meta.keys() and meta[k] is not None}
  except Exception:  # noqa: BLE001 - unreadable metadata: damage, which the caller reports
    return ''
  out = []
  for name, tree in items.items():
    if name not in saved:
      continue
    want, have = leaf_shapes(tree), leaf_shapes(saved[name])
    bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if bad:
      out.append(
          f'{name}: {len(bad)} array(s) differ, e.g. '
          + ', '.join(
              f'{k} saved {have.get(k, "(absent)")} vs config {want.get(k, "(absent)")}'
              for k in bad[:3]
          )
      )
  return '; '.join(out)


def _brief(error: Exception) -> str:
  """The first line of an error (TensorStore appends whole specs), at most 300 characters."""
  text = str(error).split('[tensorstore_spec')[0].split(' See full TensorStore')[0]
  text = text.strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300].rstrip(". ") if text else ""}'


def damaged_error(
    where: str, directory, step: int, steps, error: Exception, *, loading: bool = False
) -> errors.BadFile:
  """The error for a checkpoint that cannot be read: what failed and how to go on."""
  earlier = [s for s in steps if s < step]
  if not earlier:
    hint = 'no earlier checkpoint is left' + ('' if loading else ': start a new workdir')
  elif loading:
    hint = f'the checkpoint before it is step {max(earlier)} (step={max(earlier)})'
  else:
    hint = (
        f'to resume from the checkpoint before it (step {max(earlier)}), move '
        f'{epath.Path(directory) / str(step)} out of {directory}'
    )
  return errors.BadFile(
      f'{where} cannot be read: a file in it is damaged or missing (truncated, '
      f'overwritten, deleted?): {_brief(error)}. Nothing was changed; {hint}'
  )


def check_workdir(workdir: str, run: RunConfig) -> None:
  """Refuse a workdir that holds a run of another model: one whose parameters have other shapes,
  or whose model fields differ in more than RESUMABLE_FIELDS."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  steps = saved_steps(workdir)
  saved = upgrade(
      paths.read_json(
          path,
          'the training config a run writes',
          f'move it out of {workdir}: the run then '
          + (f'resumes from its latest checkpoint (step {steps[-1]})' if steps else 'starts afresh')
          + ' and writes it again',
      )
  )
  # with the projector the saved run's alignment trained (as run.model has this run's)
  old_model = align.config_of(saved.get('align')).model_config(model_of(saved['model']))
  new_model = run.model
  old, new = old_model.to_dict(), new_model.to_dict()
  fields = [k for k in new if k not in COMPUTE_OPTIONS and old[k] != new[k]]
  # same fields, same model: the shapes need comparing only when anything changed
  shapes = shape_changes(old_model, new_model) if old != new else []
  # the weights of one objective are no start for the other (velocity vs eps)
  objectives = (objective_of(saved.get('diffusion')), run.objective)
  if shapes or [k for k in fields if k not in RESUMABLE_FIELDS] or objectives[0] != objectives[1]:
    diffs = [f'{k}: workdir {old[k]!r} vs config {new[k]!r}' for k in fields]
    if objectives[0] != objectives[1]:
      diffs.insert(0, f'diffusion.objective: workdir {objectives[0]!r} vs config {objectives[1]!r}')
    if shapes:
      more = f'; and {len(shapes) - 4} more' if len(shapes) > 4 else ''
      diffs.append(f'parameter shapes {"; ".join(shapes[:4])}{more}')
    raise ValueError(
        f'workdir {workdir} holds a run of another model shape ('
        + '; '.join(diffs)
        + '); use a new workdir'
    )


def write_config(workdir: str, run: RunConfig) -> None:
  """Record the config of the run (after a successful resume, so a refused one leaves it)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(os.fspath(path), run.config_json)


def read_train_config(workdir: str) -> ml_collections.ConfigDict:
  """A training workdir's config.json: the run's whole training config (today's key names)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{workdir} has no {CONFIG_FILE}: not a training workdir')
  return ml_collections.ConfigDict(
      upgrade(
          paths.read_json(
              path,
              'the training config a run writes',
              'the next training start on this workdir writes it again',
          )
      )
  )


def last_good(workdir: str) -> str:
  """Which checkpoint of a workdir is the last good one, and that the next start resumes from
  it (a sentence for an error that stopped the run)."""
  steps = saved_steps(workdir)
  if not steps:
    return 'no checkpoint was written yet: the next start begins at step 0'
  return (
      f'the last good checkpoint is step {steps[-1]} '
      f'({epath.Path(paths.resolve(workdir)) / CHECKPOINT_DIR / str(steps[-1])}): the next '
      'start resumes from it'
  )


def saved_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints of a workdir (orbax renames a save into place as
  ``checkpoints/<step>`` when it is complete), oldest first."""
  folder = epath.Path(paths.resolve(workdir)) / CHECKPOINT_DIR
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
