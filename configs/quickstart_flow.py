"""The quickstart with the flow-matching objective: same model, data and recipe, velocity MSE.

  python -m mdt_jax.main --config=configs/quickstart_flow.py --workdir=runs/quickstart_flow

Sample grids and the evaluation use Heun with 20 model evaluations; no learned variance and no
min-SNR weight (both are DDPM settings). See docs/flow_matching.md.
"""

import importlib.util
import os


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.py')
  spec = importlib.util.spec_from_file_location('quickstart_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _quickstart()
  c.model.learn_sigma = False
  c.diffusion.update(objective='flow', min_snr_gamma=None, t_sampling='uniform', t_shift=1.0)
  c.sampling.update(sampler='heun', steps=20)
  return c
