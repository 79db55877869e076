"""Every shipped config (configs/*.py) loads as the command line loads it and passes the checks a
run makes before any work: a typo in a config file fails here, not an hour into a pod job."""

import os
import tempfile

import pytest
from absl import flags
from ml_collections import config_flags

from flax import nnx

from studies import digits_teacher, flow_matching, learning_curves, representation_alignment
from mdt_jax.training import samples, sharding
from mdt_jax.training.run import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py'))
# the study configs of tools/learning_curves.py and tools/flow_matching.py (a `train` inside), with
# the check each study makes of its variants' training configs
STUDIES = {
    'learning_curves.py': learning_curves.check_study,
    'flow_matching.py': flow_matching.check_study,
    'representation_alignment.py': lambda config: check_alignment_study(config),
}
# ml_collections loads config files with importlib's deprecated load_module()
pytestmark = pytest.mark.filterwarnings('ignore:the load_module\\(\\) method is deprecated')


def load(name: str):
  """The config as `--config=configs/NAME` gives it (ml_collections' config_flags)."""
  holder = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=holder)
  holder(['prog', f'--config={os.path.join(ROOT, "configs", name)}'])
  return holder.config


def check_alignment_study(config):
  """The alignment study's check, with an untrained teacher of the study's architecture as the
  REPA teacher folder (the check reads its settings, not how well it was trained)."""
  teacher = representation_alignment.teacher_config(config)
  with tempfile.TemporaryDirectory() as tmp:
    model = digits_teacher.Classifier(teacher, rngs=nnx.Rngs(0))
    folder = digits_teacher.save_backbone(model, os.path.join(tmp, 'teacher'), accuracy=0.0)
    representation_alignment.check_study(config, folder)


def test_every_config_file_is_checked():
  assert 'quickstart.py' in CONFIGS and 'mdtv2_xl2.py' in CONFIGS and len(CONFIGS) >= 6


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_config_passes_the_checks_of_a_run(name):
  config = load(name)
  if name in STUDIES:
    STUDIES[name](config)  # validates every variant's training config
    config = config.train
  run = validate(config)
  model = run.model
  samples.sampler_config(run)  # the grid / evaluation sampler settings
  mesh = sharding.make_mesh(config.mesh.to_dict())  # 8 test devices
  assert config.global_batch_size % sharding.data_parallel_size(mesh) == 0
  assert model.num_classes == (10 if config.data.name == 'digits' else 1000)
