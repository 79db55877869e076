"""Per-chip figures of the TPU generations: the cost model of the sharding strategies
(`mdt_jax/training/cost.py`) and the compiler's roofline (`tools/benchmarks/tpu.py`) read them here.

FLOP/s, HBM capacity and HBM bandwidth: the Cloud TPU system architecture pages
(https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e; v5p: 459 TFLOP/s, 95 GB,
2765 GB/s; v6e: 918 TFLOP/s, 32 GB, 1638 GB/s; v5e: 197 TFLOP/s, 16 GB, 819 GB/s; v4: 275 TFLOP/s,
32 GiB, 1200 GB/s). ICI bandwidth per link, both directions together: "How to Scale Your Model",
chapter "How to Think About TPUs" (https://jax-ml.github.io/scaling-book/tpus/): v4 9e10, v5p
1.8e11, v5e 9e10, v6e 1.8e11 bytes/s.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation's per-chip figures."""

  name: str  # as in slice names: v4, v5e, v5p, v6e
  peak_bf16_tflops: float  # dense bf16 matrix-unit peak per chip
  hbm_gb: float  # HBM capacity per chip, 1e9 bytes (the spec sheet's)
  hbm_gbps: float  # HBM bandwidth per chip, 1e9 bytes/s
  ici_link_gbps: float  # ICI bandwidth of one link, both directions, 1e9 bytes/s
  torus_dims: int  # 3: v4/v5p (slice names count TensorCores, 2 per chip); 2: v5e/v6e
  max_chips: int  # the largest single slice of power-of-two size listed here

  @property
  def cores_per_chip(self) -> int:
    """TensorCores a slice name counts per chip (v4-8 and v5p-8 are 4 chips: one megacore each)."""
    return 2 if self.torus_dims == 3 else 1


GENERATIONS = {
    g.name: g
    for g in (
        Generation('v4', 275.0, 32 * 2**30 / 1e9, 1200.0, 90.0, 3, 2048),
        Generation('v5e', 197.0, 16.0, 819.0, 90.0, 2, 256),
        Generation('v5p', 459.0, 95.0, 2765.0, 180.0, 3, 4096),
        Generation('v6e', 918.0, 32.0, 1638.0, 180.0, 2, 256),
    )
}

# jax's device_kind -> generation
DEVICE_KINDS = {
    'TPU v4': 'v4',
    'TPU v5 lite': 'v5e',
    'TPU v5e': 'v5e',
    'TPU v5': 'v5p',
    'TPU v5p': 'v5p',
    'TPU v6 lite': 'v6e',
    'TPU v6e': 'v6e',
}


def of_device(device) -> Generation | None:
  """The generation of a jax device, or None (not a TPU this table knows)."""
  name = DEVICE_KINDS.get(getattr(device, 'device_kind', ''))
  return GENERATIONS[name] if name else None


def wraps(g: Generation, shape: tuple[int, ...]) -> tuple[bool, ...]:
  """Which axes of a slice of `shape` chips close into rings: on v4/v5p every axis of a slice
  of whole 4x4x4 cubes, none of a smaller one; on v5e/v6e an axis of 16 chips."""
  if g.torus_dims == 3:
    return (all(d % 4 == 0 for d in shape),) * len(shape)
  return tuple(d == 16 for d in shape)


def closed(g: Generation, shape: tuple[int, ...]) -> bool:
  """Whether every axis of the slice (of more than one chip) closes into a ring: a collective
  over all its chips then runs on every axis's links at once (BENCHMARKS.md, the compiler's
  collective algorithms)."""
  return all(w for w, d in zip(wraps(g, shape), shape) if d > 1)


def torus_shape(devices) -> tuple[int, ...] | None:
  """Chips along each torus axis of TPU `devices` (their coordinates' extent), or None."""
  g = of_device(devices[0]) if devices else None
  coords = [getattr(d, 'coords', None) for d in devices]
  if g is None or any(c is None for c in coords):
    return None
  return tuple(
      max(c[i] for c in coords) - min(c[i] for c in coords) + 1 for i in range(g.torus_dims)
  )


def closed_torus(devices) -> bool:
  """Whether `devices` are a TPU slice whose every axis closes into a ring."""
  shape = torus_shape(devices)
  return shape is not None and closed(of_device(devices[0]), shape)
