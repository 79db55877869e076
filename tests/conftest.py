"""Every test sees 8 simulated CPU devices (set before jax is imported anywhere)."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

assert jax.device_count() == 8, f'expected 8 simulated devices, got {jax.device_count()}'


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def full_run(tmp_path_factory):
  """One uninterrupted 6-step run of tests/micro_config.py on 8 devices, shared by the training
  tests (which copy its workdir) and the multi-process test (its reference)."""
  from micro_config import get_config
  from mdt_jax.training.loop import train_and_evaluate
  work = tmp_path_factory.mktemp('full')
  return work, train_and_evaluate(get_config(), str(work))
