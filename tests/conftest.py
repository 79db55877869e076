"""Every test sees 8 simulated CPU devices (set before jax is imported anywhere)."""

import os
import tempfile

# Tests compile many small programs and run them briefly: LLVM's cheapest optimisation level, and
# with it XLA:CPU's older elemental emitters instead of its MLIR fusion emitters (together about
# half the compile time of a train step; at the default level the elemental emitters compile and
# run slower, so only tests use them: BENCHMARKS.md, "The test suite"). And one LLVM module per
# program instead of parts compiled on parallel threads: the suite keeps every core busy with
# its own processes, and the split costs 12% more compile CPU (micro train step, median of 5).
TEST_XLA_FLAGS = (
    '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false '
    '--xla_cpu_parallel_codegen_split_count=1'
)
_USERS_XLA_FLAGS = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '')
    + ' '
    + TEST_XLA_FLAGS
    + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def _session_folder(variable: str, prefix: str) -> str | None:
  """The folder named by ``variable``: made here (and returned, to be removed at the end) when
  this is the run's first process; pytest-xdist workers and the subprocesses tests start
  inherit the variable and share the folder."""
  if variable in os.environ:
    return None
  os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
  return os.environ[variable]


# The suite is dominated by compiling the same small programs again (resumed runs, subprocess
# launches): a persistent compilation cache for the session.
# Files the package caches (the digits classifier, converted Inception weights) go to a folder of
# the session, never to the user's ~/.cache: the digits classifier is trained once per session and
# no test depends on what an earlier run left behind.
_OWN_FOLDERS = [
    _session_folder('JAX_COMPILATION_CACHE_DIR', 'mdt_jax_test_cache_'),
    _session_folder('MDT_JAX_TEST_DATA_CACHE', 'mdt_jax_test_data_cache_'),
]
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ['MDT_JAX_CACHE'] = os.environ['MDT_JAX_TEST_DATA_CACHE']


def _train_digits_classifier_in_background():
  """The digits classifier (the quickstart's evaluation; several test files need it, the first
  about two minutes in) trained into the session's cache while the first tests run, with XLA's
  default flags as users train it: 330 steps, which the tests' optimisation level 0 makes 1.6x
  slower. A test that needs it before it is written waits for it (its file lock)."""
  import subprocess
  import sys

  code = 'from mdt_jax.evaluation import digits_classifier as dc; dc.load_digits_classifier()'
  env = dict(os.environ, XLA_FLAGS=_USERS_XLA_FLAGS, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  log = open(os.path.join(os.environ['MDT_JAX_CACHE'], 'digits_classifier.log'), 'w+')
  proc = subprocess.Popen(
      [sys.executable, '-c', code], env=env, stdout=log, stderr=subprocess.STDOUT
  )
  return proc, log


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the run's first process (xdist's controller, or pytest alone) starts it
_CLASSIFIER = _train_digits_classifier_in_background() if _OWN_FOLDERS[1] else None

import jax  # noqa: E402

assert jax.device_count() == 8, f'expected 8 simulated devices, got {jax.device_count()}'


import pytest  # noqa: E402


def required_distributions(path: str = os.path.join(ROOT, 'requirements-test.txt')) -> list[str]:
  """The distributions a requirements file pins, following its `-r` includes."""
  names = []
  for line in open(path):
    line = line.split('#', 1)[0].strip()
    if line.startswith('-r'):
      names += required_distributions(os.path.join(os.path.dirname(path), line[2:].strip()))
    elif line:
      names.append(line.split('==')[0].split('[')[0].strip())
  return names


def pytest_configure(config):
  """A test dependency that is not installed fails the run here, by name, instead of turning
  into skips or collection errors further down."""
  config.addinivalue_line(
      'markers', 'every_backend: trace every by_backend branch, as jits outside traced_for do'
  )
  from importlib import metadata

  missing = []
  for name in required_distributions():
    try:
      metadata.version(name)
    except metadata.PackageNotFoundError:
      missing.append(name)
  if missing:
    raise pytest.UsageError(
        f'test dependencies not installed: {", ".join(missing)} (pinned in '
        'requirements-test.txt); run: python -m pip install -r requirements-test.txt -e .'
    )


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (the README's command): one test process per core this process may use, at most 4.
  Each holds a JAX runtime with 8 simulated devices and compiles mostly on one thread, so on 2
  cores two processes keep both busy; more than 4 would trade memory for little."""
  del config
  usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(1, min(usable or 1, 4))


@pytest.fixture(scope='session', autouse=True)
def _cpu_branches_only():
  """The tests' computations are traced for the CPU they run on: `by_backend` traces the CPU's
  branch only, as the train step and the samplers do (`traced_for`). A jit outside those (a
  test's own) would otherwise trace and differentiate the TPU and GPU branches too, which are
  never compiled here: 2.3x the tracing of the micro model's loss gradient. The TPU and GPU
  branches have tests of their own (tests/test_model.py, test_attention.py, test_aot_compile.py)."""
  from mdt_jax.models import platform

  with platform.assume_backend('cpu'):
    yield


@pytest.fixture(autouse=True)
def _every_backend(request):
  """Tests marked `every_backend` see by_backend as jits outside traced_for do."""
  if request.node.get_closest_marker('every_backend') is None:
    yield
    return
  from mdt_jax.models import platform

  with platform.assume_backend(None):
    yield


@pytest.fixture(scope='session')
def full_run():
  """One uninterrupted 6-step run of tests/micro_config.py on 8 devices, shared by the training
  tests (which copy its workdir), the interrupted runs (their reference), the export tests and
  the profile test: it profiles steps 3 and 4 (profiling does not change what is computed).

  Trained once per test run: the first test process to ask trains it into the run's shared data
  folder, the others (pytest-xdist workers) wait for it and read its result back, the state as
  NumPy arrays in every process. Tests only read the workdir."""
  import pathlib
  import pickle

  from mdt_jax.atomic import atomic_file, file_lock

  shared = pathlib.Path(os.environ['MDT_JAX_TEST_DATA_CACHE']) / 'full_run'
  result = shared / 'result.pkl'
  with file_lock(f'{shared}.lock'):
    if not result.exists():
      from micro_config import get_config
      from mdt_jax.training.loop import train_and_evaluate

      config = get_config()
      config.profile_steps = 2
      out = jax.device_get(train_and_evaluate(config, str(shared / 'work')))
      with atomic_file(str(result)) as f:  # a worker that dies mid-write leaves no result
        pickle.dump(out, f)
  return shared / 'work', pickle.loads(result.read_bytes())


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """'gs://mdt-test': a bucket of a GCS emulator on loopback, shared by the session, with every
  GCS client of the project (gcsfs, TensorStore, ArrayRecord) pointed at it, here and in the
  subprocesses the tests start. Skipped only where the emulator binary cannot run."""
  import gcs_emulator
  from mdt_jax import paths

  try:
    server = gcs_emulator.Server(str(tmp_path_factory.mktemp('gcs')))
  except gcs_emulator.CannotRun as e:
    pytest.skip(f'no GCS emulator: {e}')
  env = paths.emulator_env(server.url)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  # fsspec read FSSPEC_GCS_TOKEN when it was imported, maybe before this fixture set it
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'
  assert (
      fsspec.get_filesystem_class('gs').__name__ == 'GCSFileSystem'
  ), 'gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set'
  try:
    yield 'gs://mdt-test'
  finally:
    server.stop()
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.config.conf.get('gcs', {}).pop('token', None)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  import shutil

  if _CLASSIFIER is not None:
    proc, log = _CLASSIFIER
    proc.wait()  # a run shorter than its training waits for it
    if proc.returncode:
      log.seek(0)
      print(f'the background training of the digits classifier failed:\n{log.read()[-2000:]}')
    log.close()

  for folder in _OWN_FOLDERS:
    if folder:
      shutil.rmtree(folder, ignore_errors=True)
