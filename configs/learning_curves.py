"""Learning-speed study: MDTv2 vs the DiT-style baseline (same model, masked branch off) on digits.

  python tools/learning_curves.py --config=configs/learning_curves.py --out=docs/learning_speed

Sized to finish in about an hour on 2 CPU cores (see docs/learning_speed.md for the measured
times). ``train`` is an ordinary training config; the study runs it once per seed and variant
with ``seed`` and ``mask_branch`` set, everything else (model, data order, batch, steps) equal.
"""
import ml_collections

from mdt_jax.models.presets import model_config
from mdt_jax.training.config import base_config


def train_config() -> ml_collections.ConfigDict:
  c = base_config()
  # 16x16x1 digits, patch 2 -> 64 tokens; the official mask ratio 0.3 (+-0.2 span).
  c.model = model_config('S/2', input_size=16, in_channels=1, hidden_size=64, depth=4,
                         num_heads=4, decode_layer=1, num_classes=10)
  c.data = dict(name='digits', image_size=16, flip=False, num_threads=1, prefetch=4,
                vae_decoder='')
  c.global_batch_size = 32
  c.total_steps = 2400
  c.optimizer.learning_rate = 3e-3     # 1e-3 had not learned the classes by step 2000
  c.ema_decay = 0.995
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every_steps = c.total_steps   # one checkpoint at the end (the loop always saves)
  c.async_checkpointing = False
  c.log_every_steps = 100
  c.sample_every_steps = 0
  return c


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = train_config()
  c.seeds = (0, 1, 2)               # each seed: init, data order and noise of both variants
  c.eval_every_steps = 300          # and at the last step
  c.eval_num_samples = 500          # labels 0..9 repeated: a fixed, balanced label set
  c.eval_seed = 0                   # sampling noise, the same at every evaluation
  c.sampling = dict(sampler='dpm_solver++', steps=20, cfg_scale=2.0,
                    guidance_schedule='constant', guided_channels='all')
  c.classifier_seed = 0             # the digits classifier of mdt_jax.evaluation
  return c
