"""Bad inputs, each with what it gets: a clear error that names the value and what was expected,
raised before work or data is lost. One test (or parameter) per row of docs/bad_inputs.md."""

import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import config_flags
from PIL import Image
from safetensors.numpy import load_file, save_file

import launch
import mdt_jax
from micro_config import get_config
from mdt_jax import errors, evaluate as evaluate_cli
from mdt_jax.data import image_sources
from mdt_jax.data.records import encode_latent_record
from mdt_jax.training import checkpoints
from mdt_jax.training.loop import train_and_evaluate
from mdt_jax.training.run import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(**kw):
  c = get_config()
  for k, v in kw.items():
    c[k] = v
  return c


def _snapshot(folder) -> dict:
  """Every file under a folder and a hash of its bytes: 'nothing lost' is 'nothing changed'."""
  return {
      os.path.relpath(os.path.join(d, f), folder): hashlib.sha1(
          open(os.path.join(d, f), 'rb').read()
      ).hexdigest()
      for d, _, fs in os.walk(folder)
      for f in fs
  }


# -------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def workdir(full_run, tmp_path):
  """A copy of the 6-step run: checkpoints at steps 3 and 6."""
  work = tmp_path / 'w'
  shutil.copytree(full_run[0], work)
  return work


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _zero(path):
  with open(path, 'r+b') as f:
    f.write(b'\0' * os.path.getsize(path))


def _truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[: len(data) // 2])


DAMAGE = {
    'zeroed array file': lambda c: _zero(_largest_file(c / 'ema_params' / 'ocdbt.process_0')),
    'truncated array index': lambda c: _truncate(c / 'params' / 'manifest.ocdbt'),
    'deleted item': lambda c: shutil.rmtree(c / 'opt_state'),
    'zeroed data position': lambda c: _zero(c / 'data' / 'process_0-of-1.json'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_checkpoint_is_refused_and_left_as_it_is(workdir, damage):
  DAMAGE[damage](workdir / 'checkpoints' / '6')
  before = _snapshot(workdir)
  with pytest.raises(
      ValueError,
      match=r'checkpoint at step 6 in .*checkpoints cannot be read: '
      r'a file in it is damaged or missing .* Nothing was '
      r'changed; to resume from the checkpoint before it \(step '
      r'3\), move .*checkpoints/6 out of',
  ):
    train_and_evaluate(micro_config(total_steps=9), str(workdir))
  assert _snapshot(workdir) == before
  if damage == 'zeroed array file':  # the EMA weights: loading them fails as clearly
    with pytest.raises(
        ValueError,
        match=r'ema_params of the checkpoint at step 6 .* cannot be '
        r'read: .* the checkpoint before it is step 3',
    ):
      mdt_jax.load_pretrained(str(workdir))


def test_after_moving_the_damaged_checkpoint_away_the_run_resumes(workdir, full_run):
  _zero(_largest_file(workdir / 'checkpoints' / '6' / 'params'))
  shutil.move(workdir / 'checkpoints' / '6', workdir.parent / 'damaged_6')  # as the error says
  out = train_and_evaluate(micro_config(total_steps=6), str(workdir))
  assert out['step'] == 6  # steps 4-6 redone from step 3: the same weights (same mesh)
  for a, b in zip(_leaves(out['state'].params), _leaves(full_run[1]['state'].params)):
    np.testing.assert_array_equal(a, b)


def test_a_killed_save_is_ignored(workdir):
  """orbax writes into <step>.orbax-checkpoint-tmp and renames when complete: a save killed
  midway leaves the temporary folder, which is not a checkpoint."""
  ckpts = workdir / 'checkpoints'
  shutil.copytree(ckpts / '6', ckpts / '9.orbax-checkpoint-tmp')
  shutil.rmtree(ckpts / '9.orbax-checkpoint-tmp' / 'opt_state')
  out = train_and_evaluate(micro_config(total_steps=6), str(workdir))
  assert out['step'] == 6  # resumed from step 6, the last complete checkpoint


def _leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# --------------------------------------------------------------------- changed config, resume


@pytest.mark.parametrize(
    'old, new, match',
    [
        # the label table's null row comes and goes with label dropout
        (
            dict(class_dropout_prob=0.1),
            dict(class_dropout_prob=0.0),
            r'class_dropout_prob: workdir 0.1 vs config 0.0; parameter shapes '
            r'y_embedder.embedding_table.embedding: workdir \(11, 32\) vs config \(10, 32\)',
        ),
        (
            dict(class_dropout_prob=0.0),
            dict(class_dropout_prob=0.2),
            r'y_embedder.embedding_table.embedding: workdir \(10, 32\) vs config \(11, 32\)',
        ),
        (
            dict(),
            dict(learn_sigma=False),
            r'final_layer.linear.bias: workdir \(8,\) vs config \(4,\)',
        ),
        # depth 3 -> 4 with decode_layer 1 keeps every parameter shape (half_depth stays 1), yet it
        # is another model: fields other than compute options and regularisers are compared too
        (dict(), dict(depth=4), r'depth: workdir 3 vs config 4\); use a new workdir'),
    ],
)
def test_a_changed_model_is_refused(tmp_path, old, new, match):
  c = micro_config()
  c.model.update(old)
  checkpoints.write_config(str(tmp_path), validate(c))
  c.model.update(new)
  with pytest.raises(ValueError, match=rf'holds a run of another model shape \(.*{match}'):
    checkpoints.check_workdir(str(tmp_path), validate(c))


def test_resumable_changes_are_let_through(tmp_path):
  c = micro_config()
  checkpoints.write_config(str(tmp_path), validate(c))
  c.model.update(
      class_dropout_prob=0.2, mask_ratio=0.4, mask_ratio_span=0.1, dtype='bfloat16', remat=True
  )
  checkpoints.check_workdir(str(tmp_path), validate(c))


def test_label_dropout_switched_off_on_resume_fails_before_any_work(workdir):
  before = _snapshot(workdir)
  c = micro_config(total_steps=9)
  c.model.class_dropout_prob = 0.0
  with pytest.raises(
      ValueError,
      match=r'y_embedder.embedding_table.embedding: workdir \(11, 32\) vs config \(10, 32\)',
  ):
    train_and_evaluate(c, str(workdir))
  assert _snapshot(workdir) == before


# ------------------------------------------------------------------------------ latent data


def _write_shard(path, n=16, size=4, label=lambda i: i % 2, nan_at=None, foreign=False):
  writer = ArrayRecordWriter(str(path), 'group_size:1')
  rng = np.random.default_rng(0)
  for i in range(n):
    m = rng.standard_normal((size, size, 8)).astype(np.float32)
    if i == nan_at:
      m[1, 2, 3] = np.nan
    writer.write(b'some other record' if foreign else encode_latent_record(m, m[:, ::-1], label(i)))
  writer.close()


def _latent_config(path):
  c = micro_config()
  c.data = dict(
      name='latents',
      path=str(path),
      image_size=32,
      flip=True,
      num_threads=1,
      prefetch=2,
      vae=None,
  )
  c.model.update(input_size=4, in_channels=4, num_classes=2)
  c.global_batch_size, c.total_steps = 8, 2
  return c


def _truncate_shard(path):
  _write_shard(path)
  _truncate(path)


def _zero_shard(path):
  _write_shard(path)
  _zero(path)


SHARDS = {
    'truncated shard': (
        _truncate_shard,
        r'latent shard .*b.array_record cannot be read '
        r'\(truncated, overwritten or not an ArrayRecord',
    ),
    'zeroed shard': (_zero_shard, r'latent shard .*b.array_record cannot be read'),
    'foreign shard': (
        lambda p: _write_shard(p, foreign=True),
        r'latent shard .*b.array_record does not hold latent records',
    ),
    'shard of another latent size': (
        lambda p: _write_shard(p, size=8),
        r'latent shard .*b.array_record holds 8x8x4 latents but .*a.array_record holds 4x4x4',
    ),
    'empty data folder': (None, r"no \*.array_record latent shards found at '.*lat'"),
}


@pytest.mark.parametrize('case', sorted(SHARDS))
def test_bad_shards_are_refused_before_any_work(tmp_path, case):
  make, match = SHARDS[case]
  os.makedirs(tmp_path / 'lat')
  if make:
    _write_shard(tmp_path / 'lat' / 'a.array_record')
    make(tmp_path / 'lat' / 'b.array_record')
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    train_and_evaluate(_latent_config(tmp_path / 'lat'), str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


@pytest.mark.parametrize(
    'case, match',
    [
        (
            'nan',
            r'an input batch from .*lat holds NaN or inf in 1 example\(s\) \(class ids \[1\]\)',
        ),
        (
            'class ids',
            r'class id [234] in an input batch from .*lat is outside \[0, 2\) '
            r'\(model.num_classes=2\)',
        ),
    ],
)
def test_bad_values_stop_the_run_before_a_step_uses_them(tmp_path, case, match):
  os.makedirs(tmp_path / 'lat')
  _write_shard(
      tmp_path / 'lat' / 'a.array_record',
      nan_at=3 if case == 'nan' else None,
      label=(lambda i: i % 5) if case == 'class ids' else (lambda i: i % 2),
  )
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(_latent_config(tmp_path / 'lat'), str(tmp_path / 'work'))
  assert not os.listdir(tmp_path / 'work' / 'checkpoints')  # no step was taken or saved


def test_more_classes_in_the_manifest_than_the_model_has(tmp_path):
  os.makedirs(tmp_path / 'lat')
  _write_shard(tmp_path / 'lat' / 'a.array_record')
  (tmp_path / 'lat' / 'manifest.json').write_text(json.dumps({'class_names': list('abcde')}))
  with pytest.raises(ValueError, match=r'hold 5 classes \(manifest.json\) but model.num_classes=2'):
    train_and_evaluate(_latent_config(tmp_path / 'lat'), str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_images_of_mixed_sizes_are_cropped_to_one_size():
  """Extraction takes any size and mode: ADM's centre crop to --image_size (not an error)."""
  rng = np.random.default_rng(0)
  for (h, w), mode in [((20, 17), 'RGB'), ((70, 40), 'L'), ((33, 33), 'RGBA'), ((9, 300), 'RGB')]:
    arr = rng.integers(0, 256, (h, w, {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]), dtype=np.uint8)
    image = Image.fromarray(arr[..., 0] if mode == 'L' else arr, mode)
    out = image_sources.preprocess(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# --------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    'override, error, match',
    [
        ('--config.modle.depth=2', KeyError, 'Did you mean "model" instead of "modle"'),
        ('--config.model.hidden_sizee=3', AttributeError, 'Did you mean "hidden_size"'),
        (
            '--config.total_steps=abc',
            flags.IllegalFlagValueError,
            '--config.total_steps=abc: invalid literal for int',
        ),
    ],
)
def test_mistyped_command_line_config_keys_are_refused(override, error, match):
  """The command line of mdt_jax.main (its config flag, parsed the same way)."""
  argv = ['main', f'--config={ROOT}/tests/micro_config.py', override]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv, lock_config=True, sys_argv=argv)
  with pytest.raises(error, match=match):
    fv(argv)


def test_unknown_config_keys_in_a_config_file_are_refused(tmp_path):
  c = micro_config()
  with c.unlocked():
    c.optimizer.lerning_rate = 1.0
  with pytest.raises(ValueError, match=r"unknown config keys \['optimizer.lerning_rate'\]"):
    train_and_evaluate(c, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_a_batch_that_does_not_divide_over_the_devices(tmp_path):
  with pytest.raises(
      ValueError,
      match=r'global_batch_size 12 is not divisible by the data-parallel size 8 \(mesh',
  ):
    train_and_evaluate(micro_config(global_batch_size=12), str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


# ------------------------------------------------------------------------------ model folders


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
  from flax import nnx
  from mdt_jax import MDT, MDTConfig
  from mdt_jax.hub.folder import save_model_folder

  cfg = MDTConfig.from_dict(get_config().model.to_dict())
  folder = str(tmp_path_factory.mktemp('model') / 'm')
  save_model_folder(folder, nnx.state(MDT(cfg, rngs=nnx.Rngs(0)), nnx.Param), cfg)
  return folder


@pytest.mark.parametrize(
    'edit, match',
    [
        ('missing', r'1 missing keys: final_layer.linear.bias'),
        ('extra', r'1 unexpected keys: extra.kernel'),
    ],
)
def test_model_folder_with_a_missing_or_extra_tensor(model_folder, tmp_path, edit, match):
  folder = tmp_path / 'm'
  shutil.copytree(model_folder, folder)
  tensors = load_file(str(folder / 'model.safetensors'))
  if edit == 'missing':
    del tensors['final_layer.linear.bias']
  else:
    tensors['extra.kernel'] = np.zeros((2, 2), np.float32)
  save_file(tensors, str(folder / 'model.safetensors'))
  with pytest.raises(ValueError, match=match):
    mdt_jax.load_pretrained(str(folder))


def _cut_weights(folder):
  _truncate(folder / 'model.safetensors')


@pytest.mark.parametrize(
    'edit, match',
    [
        (
            lambda f: os.remove(f / 'model.safetensors'),
            r'.*m has no weights: model.safetensors is missing \(a model folder holds config.json '
            r'and model.safetensors\); copy or export the model folder again',
        ),
        (
            _cut_weights,
            r'.*m/model.safetensors is not a readable safetensors file \(\d+ bytes: .*\): expected '
            r'the weights an export writes \(cut short in a copy\?\); copy or export the model '
            r'folder again',
        ),
    ],
    ids=['missing weights', 'truncated weights'],
)
def test_model_folder_with_missing_or_truncated_weights(model_folder, tmp_path, edit, match):
  folder = tmp_path / 'm'
  shutil.copytree(model_folder, folder)
  edit(folder)
  with pytest.raises(errors.BadFile) as e:
    mdt_jax.load_pretrained(str(folder))
  assert re.fullmatch(match, str(e.value)), str(e.value)


def test_a_checkpoint_missing_an_item_names_it_and_the_one_before(workdir):
  shutil.rmtree(workdir / 'checkpoints' / '6' / 'opt_state')
  with pytest.raises(errors.BadFile) as e:
    train_and_evaluate(micro_config(total_steps=9), str(workdir))
  assert re.search(
      r'checkpoint at step 6 in .*checkpoints cannot be read: .* FileNotFoundError: '
      r'.*checkpoints/6 has no opt_state \(a checkpoint holds params, ema_params, opt_state, '
      r'meta, data\)\. Nothing was changed; to resume from the checkpoint before it \(step 3\)',
      str(e.value),
  ), str(e.value)


# -------------------------------------------------------------------------------- evaluation


def test_reference_batch_of_another_image_size(tmp_path):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / 'samples.npz', rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
  np.savez(tmp_path / 'ref.npz', rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
  with pytest.raises(
      ValueError,
      match=r"samples '.*samples.npz' are 16x16 images but the "
      r"reference batch '.*ref.npz' holds 32x32 ones",
  ):
    evaluate_cli.main(
        [
            '--samples',
            str(tmp_path / 'samples.npz'),
            '--reference',
            str(tmp_path / 'ref.npz'),
            '--inception',
            str(tmp_path / 'absent'),
            '--quiet',
        ]
    )


# ------------------------------------------------------------------- command lines: one line


def _cli(capsys, monkeypatch, module, *argv: str) -> tuple[int, str]:
  """A command line's main in this process as its ``__main__`` runs it (flags parsed, user
  errors reported): (exit status, stderr). sys.argv too: the config flag defines its override
  flags (--config.a.b) from it."""
  name = module.__name__.rsplit('.', 1)[-1]
  monkeypatch.setattr(sys, 'argv', [name, *argv])
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    try:
      errors.parse_flags([name, *argv])
      errors.guard(module.main)([name])
    finally:
      module.FLAGS.unparse_flags()
  return exit_.value.code, capsys.readouterr().err


def _truncated_json(path, obj) -> None:
  text = json.dumps(obj, indent=2)
  path.write_text(text[: len(text) // 2])


def test_a_workdir_that_is_a_file_is_one_line_from_the_command_line(tmp_path):
  """The one subprocess test: `python -m mdt_jax.main` itself reports one line, status 2."""
  (tmp_path / 'afile').write_text('')
  line = launch.run_user_error(launch.main_command(str(tmp_path / 'afile'), 6))
  assert re.search(r'error: --workdir .*afile is a file, expected a folder', line), line


MAIN_CASES = {
    'truncated workdir config.json': (
        lambda w: _truncated_json(w / 'config.json', micro_config().to_dict()),
        {},
        r'error: .*w/config.json is not valid JSON \(\d+ characters; .*\): expected the training '
        r'config a run writes; move it out of .*w: the run then starts afresh',
    ),
    'total_steps=0': (None, dict(total_steps=0), r'error: total_steps must be positive'),
    'negative batch size': (
        None,
        dict(global_batch_size=-8),
        r'error: global_batch_size must be positive, got -8',
    ),
}


@pytest.mark.parametrize('case', sorted(MAIN_CASES))
def test_user_errors_of_training_are_one_line(capsys, tmp_path, case):
  """What mdt_jax.main prints for errors of train_and_evaluate (its main's one call; mdt_jax.main
  itself is not imported here: its required --workdir flag would bind every later absl entry
  point of this process)."""
  make, config, match = MAIN_CASES[case]
  os.makedirs(tmp_path / 'w')
  if make:
    make(tmp_path / 'w')
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    errors.guard(train_and_evaluate)(micro_config(**config), str(tmp_path / 'w'))
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert re.fullmatch(match + '.*', launch.one_line(err)), err
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # refused before any work


def test_a_truncated_model_folder_config_is_one_line_from_sample(
    capsys, monkeypatch, model_folder, tmp_path
):
  from mdt_jax import sample

  folder = tmp_path / 'm'
  shutil.copytree(model_folder, folder)
  _truncated_json(folder / 'config.json', json.loads((folder / 'config.json').read_text()))
  code, err = _cli(capsys, monkeypatch, sample, f'--model={folder}', f'--out={tmp_path / "out"}')
  assert code == 2
  assert re.fullmatch(
      r'error: .*m/config.json is not valid JSON \(\d+ characters; .*\): expected the model '
      r'folder config \(mdt_jax.model\) that an export writes; copy or export the model folder '
      r'again',
      launch.one_line(err),
  )
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize(
    'masks, match',
    [
        (
            np.ones((2, 4, 4), np.uint8),
            r'error: masks must have shape \[N, H, W\] = \(2, 8, 8\) .*got \(2, 4, 4\)',
        ),
        (
            np.full((2, 8, 8), 0.5, np.float32),
            r'error: masks must be binary \(1 = known, 0 = unknown\), got other values such as '
            r'\[0.5\]',
        ),
    ],
)
def test_bad_masks_are_one_line_from_inpaint(capsys, monkeypatch, tmp_path, masks, match):
  from mdt_jax import inpaint

  np.savez(tmp_path / 'images.npz', np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int32))
  np.savez(tmp_path / 'masks.npz', masks)
  code, err = _cli(
      capsys,
      monkeypatch,
      inpaint,
      f'--model={tmp_path / "absent"}',
      f'--images={tmp_path / "images.npz"}',
      f'--masks={tmp_path / "masks.npz"}',
      f'--out={tmp_path / "out"}',
  )
  assert code == 2
  assert re.match(match, launch.one_line(err)), err


def test_an_unknown_flag_is_one_line(capsys, monkeypatch):
  from mdt_jax import sample

  code, err = _cli(capsys, monkeypatch, sample, '--num_sampels=3')
  assert code == 2
  assert launch.one_line(err).startswith("error: Unknown command line flag 'num_sampels'")


def test_internal_errors_keep_their_traceback():
  """An error raised inside a library, or one that is not a user error, propagates."""

  def library_error(argv):
    del argv
    np.reshape(np.zeros(3), (2, 2))

  def key_error(argv):
    del argv
    return {}['absent']

  with pytest.raises(ValueError, match='cannot reshape'):
    errors.guard(library_error)(['x'])
  with pytest.raises(KeyError):
    errors.guard(key_error)(['x'])
  assert errors.is_user_error(errors.BadFile('x'))
