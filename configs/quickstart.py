"""Quickstart: a small MDTv2 on scikit-learn's bundled digits (16x16, 10 classes), CPU, offline.

python -m mdt_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

from mdt_jax.configs_base import base_config, model_config


def get_config():
  c = base_config()
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
  c.data.update(name='digits', image_size=16, flip=False, num_threads=2, prefetch=4, vae=None)
  c.global_batch_size = 32
  c.total_steps = 4000
  c.optimizer.learning_rate = 1.5e-3
  c.ema_decay = 0.995
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  c.sample_every_steps = 1000
  c.sampling = dict(
      sampler='ddpm',
      steps=50,
      cfg_scale=2.0,
      scale_pow=0.0,
      guidance_channels='all',
      grid_classes=10,
      grid_per_class=8,
      seed=0,
  )
  c.eval_num_samples = 200
  return c
