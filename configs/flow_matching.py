"""Flow matching vs DDPM with MDT's masking on digits (docs/flow_matching.md).

  nice -n 5 python tools/flow_matching.py --config=configs/flow_matching.py --out=docs/flow_matching

``train`` is the learning-speed study's (configs/learning_curves.py: the quickstart's model and
recipe, 4000 steps, evaluated every 250 steps on 500 class-balanced samples, seeds 0, 1, 2).
Variants set the objective and the masked branch; a flow variant trains the velocity MSE with
uniform times (SiT's recipe) and no learned variance. Curves use 20 model evaluations for both
objectives (DPM-Solver++(2M) for DDPM, Heun for flow); at the last step every run is sampled
again with each of its objective's ``final_samplers`` ("name:model evaluations"). Guidance:
constant scale 2 on every channel throughout.
"""

import importlib.util
import os

import ml_collections


def _learning_curves_config() -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'learning_curves.py')
  spec = importlib.util.spec_from_file_location('learning_curves_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  c = _learning_curves_config()
  c.variants = {
      'mdt_ddpm': dict(objective='ddpm', mask_branch=True),  # MDTv2 as published
      'mdt_flow': dict(objective='flow', mask_branch=True),  # MDT's masking, flow objective
      'dit_flow': dict(objective='flow', mask_branch=False),  # flow without the masked branch
  }
  c.baseline = 'mdt_ddpm'
  c.flow = dict(t_sampling='uniform', t_logit_mean=0.0, t_logit_scale=1.0, t_shift=1.0)
  c.curve_samplers = dict(ddpm='dpm_solver++:20', flow='heun:20')
  c.final_samplers = dict(
      ddpm=['ddpm:250', 'ddpm:50', 'dpm_solver++:20'],
      flow=[
          'euler:10',
          'euler:20',
          'euler:50',
          'heun:10',
          'heun:20',
          'heun:50',
          'euler_maruyama:50',
      ],
  )
  c.target_reference = 'ddpm:250'  # the distance flow + Heun (<= 50 evaluations) should reach
  return c
