"""Float32 eager baselines of the train step and the guided DDPM sampler: the original in
PyTorch (`torch_reference`, from tests/) and the package's own sampler run op by op in JAX."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mdt_jax.configs_base import model_of
from mdt_jax.hub import official
from mdt_jax.models.mdt import MDT
from benchmarks import torch_reference_path
from mdt_jax.sampling import SamplerConfig, labels as labels_lib
from mdt_jax.sampling.sampler import draw_samples


def torch_train_run(
    config: ml_collections.ConfigDict, state, data: dict, mask_branch: bool, steps: int, warmup: int
):
  """A function running `steps` of the original's train step in PyTorch (float32, eager, CPU)
  from the JAX state's current weights on the same batch, warmed up `warmup` steps."""
  try:
    import torch
  except ImportError as e:
    raise ImportError('the PyTorch train baseline needs torch (pip install torch)') from e
  torch_reference_path()
  from torch_reference.train import TorchTrainStep  # needs torch: imported when used

  mc = model_of(config.model.to_dict())
  sd = official.from_flax_params(nnx.State(jax.device_get(state.params)), mc)
  torch.manual_seed(0)  # the step's draws come from torch's RNG
  step = TorchTrainStep.from_config(config, sd, mask_branch=mask_branch)
  x = torch.from_numpy(np.asarray(data['x']).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.asarray(data['y']).astype(np.int64))

  def run():
    for _ in range(steps):
      loss = step(x, y)['loss']
    return loss

  for _ in range(warmup):
    step(x, y)
  return run


def bench_sampling_torch(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    batch: int,
    cfg_scale: float = 4.0,
    device: str | None = None,
) -> dict:
  """Images/s of the original's guided DDPM sampler in PyTorch, float32 and eager.

  The same weights as `bench_sampling` (random init, seed 0) in the official module tree
  (`torch_reference`); CUDA when torch sees a GPU, else CPU. Warm-up: two steps.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        'the PyTorch baseline needs torch (pip install torch); --eager_baseline '
        'is the float32 eager baseline without it'
    ) from e
  torch_reference_path()
  from torch_reference import from_official_state, sample_ddpm  # needs torch

  mc = model_of(config.model.to_dict())
  if mc.in_channels < 3:
    raise ValueError(
        'the original sampler guides eps channels 0..2; the torch baseline needs '
        f'in_channels >= 3, got {mc.in_channels}'
    )
  device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  sd = official.from_flax_params(nnx.state(MDT(mc, rngs=nnx.Rngs(0)), nnx.Param), mc)
  model = from_official_state(sd, mc, device)
  labels = np.arange(batch) % mc.num_classes
  gen = torch.Generator(device=device).manual_seed(0)
  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
  sample_ddpm(model, labels, steps=2, cfg_scale=cfg_scale, generator=gen)
  sync()
  t0 = time.perf_counter()
  sample_ddpm(model, labels, steps=steps, cfg_scale=cfg_scale, generator=gen)
  sync()
  run_s = time.perf_counter() - t0
  return {
      'sampler': 'ddpm (torch eager)',
      'steps': steps,
      'cfg_scale': cfg_scale,
      'batch': batch,
      'dtype': 'float32',
      'torch': torch.__version__,
      'device_kind': torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu',
      'run_s': run_s,
      'images_per_s': batch / run_s,
  }


def eager_ddpm(
    model, labels: np.ndarray, *, steps: int, cfg_scale: float, seed: int = 0
) -> jax.Array:
  """The guided DDPM sampler run op by op (no jit), float32 as the model computes.

  The jitted sampler's own code (`draw_samples`: guidance, the DDPM loop, per-sample noise),
  each primitive dispatched on its own as in an eager framework.
  """
  mc = model.config
  scfg = SamplerConfig(
      sampler='ddpm',
      steps=steps,
      cfg_scale=cfg_scale,
      guided_channels='first3' if mc.in_channels > 3 else 'all',
  )
  y = jnp.asarray(labels, jnp.int32)
  with jax.disable_jit():
    return draw_samples(
        model,
        scfg,
        (mc.input_size, mc.input_size, mc.in_channels),
        mc.num_classes,
        labels_lib.noise_key(seed),
        jnp.arange(y.shape[0], dtype=jnp.int32),
        y,
    )


def bench_sampling_eager(
    config: ml_collections.ConfigDict, *, steps: int, batch: int, cfg_scale: float = 4.0
) -> dict:
  """Images/s of `eager_ddpm` in float32 on the same random weights as `bench_sampling`.

  A float32 eager baseline that needs no PyTorch (for machines without it); warm-up: 2 steps.
  """
  mc = model_of(config.model.to_dict(), dtype='float32')
  model = MDT(mc, rngs=nnx.Rngs(0))
  labels = np.arange(batch) % mc.num_classes
  jax.block_until_ready(eager_ddpm(model, labels, steps=2, cfg_scale=cfg_scale))  # warm-up
  t0 = time.perf_counter()
  jax.block_until_ready(eager_ddpm(model, labels, steps=steps, cfg_scale=cfg_scale))
  run_s = time.perf_counter() - t0
  return {
      'sampler': 'ddpm (JAX eager)',
      'steps': steps,
      'cfg_scale': cfg_scale,
      'batch': batch,
      'dtype': 'float32',
      'device_kind': jax.devices()[0].device_kind,
      'run_s': run_s,
      'images_per_s': batch / run_s,
  }
