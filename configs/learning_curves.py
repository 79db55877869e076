"""Learning-speed study: MDTv2 vs the DiT-style baseline (same model, masked branch off) on digits.

  python tools/learning_curves.py --config=configs/learning_curves.py --out=docs/learning_speed

``train`` is an ordinary training config: the quickstart's model and recipe (configs/quickstart.py)
with one checkpoint at the end and the evaluation sampler below. The study runs it once per seed
and variant with ``seed`` and ``mask_branch`` set; everything else (model, initial weights, data
order, batch, steps) is equal. Sized to finish in about an hour on 2 CPU cores (measured times:
docs/learning_speed.md).
"""

import ml_collections

from mdt_jax.configs_base import base_config, model_config


def train_config() -> ml_collections.ConfigDict:
  c = base_config()
  # 16x16x1 digits in patches of 4 -> 16 tokens; the official mask ratio 0.3 (+-0.2 span).
  c.model = model_config(
      'S/4',
      input_size=16,
      in_channels=1,
      hidden_size=96,
      depth=4,
      num_heads=4,
      decode_layer=2,
      num_classes=10,
  )
  c.data.update(name='digits', image_size=16, flip=False, num_threads=1, prefetch=4, vae=None)
  c.global_batch_size = 32
  c.total_steps = 4000
  c.optimizer.learning_rate = 1.5e-3
  c.ema_decay = 0.995
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every_steps = c.total_steps  # one checkpoint at the end (the loop always saves)
  c.async_checkpointing = False
  c.log_every_steps = 100
  c.sample_every_steps = 0
  # The evaluation sampler: DPM-Solver++ (20 model calls), constant guidance 2 on all channels.
  c.sampling = dict(
      sampler='dpm_solver++',
      steps=20,
      cfg_scale=2.0,
      scale_pow=0.0,
      guidance_channels='all',
      grid_classes=10,
      grid_per_class=8,
      seed=0,
  )
  c.eval_num_samples = 0  # the loop's own end-of-run evaluation: off (the study evaluates)
  return c


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = train_config()
  c.seeds = (0, 1, 2)  # each seed: init, data order and noise of both variants
  c.eval_every_steps = 250  # and at the last step
  c.eval_num_samples = 500  # labels 0..9 repeated: a fixed, balanced label set
  c.eval_seed = 0  # sampling noise, the same at every evaluation
  c.classifier_seed = 0  # the digits classifier of mdt_jax.evaluation
  return c
