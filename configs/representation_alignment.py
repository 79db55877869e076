"""Representation alignment on digits: MDT, MDT+SRA, MDT+REPA, DiT+REPA, and REPA on both of
MDT's branches (docs/representation_alignment.md).

  nice -n 10 python tools/representation_alignment.py --config=configs/representation_alignment.py

``train`` is the learning-speed study's (configs/learning_curves.py: the quickstart's model and
recipe, evaluated on class-balanced samples with DPM-Solver++ at 20 model evaluations,
guidance 2), cut to 500 steps and 250 samples per evaluation so that the 15 runs fit about an
hour on 2 shared CPU cores (a DiT+REPA step took 0.4 s there with the machine's load at 18, an
MDT step 0.24-0.4 s at load 11): early training only.
A variant sets the masked branch and ``config.align``'s method and branches; the settings
shared by every aligned variant are ``align``. The REPA teacher is the digits' stand-in for
DINOv2 (tools/studies/digits_teacher.py, trained by the study with ``teacher``'s seed and
epochs). The threshold of "steps to reach" is plain MDT's final mean Frechet distance.
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
  c.train.total_steps = 500
  c.train.checkpoint_every_steps = c.train.total_steps
  c.eval_every_steps = 100
  c.eval_num_samples = 250
  c.variants = {
      'mdt': dict(mask_branch=True, method='none', branches='plain'),  # MDTv2 as published
      'mdt_sra': dict(mask_branch=True, method='sra', branches='plain'),
      'mdt_repa': dict(mask_branch=True, method='repa', branches='plain'),
      'dit_repa': dict(mask_branch=False, method='repa', branches='plain'),
      # the masked branch's kept tokens aligned as well
      'mdt_repa_both': dict(mask_branch=True, method='repa', branches='both'),
  }
  c.baseline = 'mdt'
  # shared by the aligned variants: block 1 of the 2 encoder blocks (REPA's 8 of 28 scaled:
  # depth 0), lambda 0.5, a projector 256 wide (REPA: 2048 for a 1152-wide model), the teacher
  # fed the 16 px digits as it was trained; SRA: the EMA's block 2 at lower noise
  c.align = dict(
      depth=0,
      weight=0.5,
      projector_dim=256,
      resolution=16,
      teacher_depth=0,
      noise_offset=0.2,
      ema_source='ema',
  )
  c.teacher = dict(seed=0, epochs=40)
  return c
