"""A tiny MDTv2 on 8x8 digits for the training tests (compiles in seconds)."""
from mdt_jax.models.presets import model_config
from mdt_jax.training.config import base_config


def get_config():
  c = base_config()
  c.model = model_config('S/2', input_size=8, in_channels=1, hidden_size=32, depth=3,
                         num_heads=2, decode_layer=1, num_classes=10)
  c.data.update(name='digits', image_size=8, flip=False, num_threads=1, prefetch=2,
                 vae_decoder='')
  c.global_batch_size = 16
  c.total_steps = 6
  c.optimizer.learning_rate = 1e-3
  c.ema_decay = 0.9
  c.checkpoint_every_steps = 3
  c.log_every_steps = 3
  # async_checkpointing stays the default (True), as in users' runs: every resume, kill and
  # preemption test runs it (test_training keeps one test of the synchronous mode)
  return c
