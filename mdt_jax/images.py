"""Image arrays and files: [-1, 1] floats to uint8, grids of images, grid image files."""

from __future__ import annotations

import math
import os

import numpy as np

from mdt_jax.atomic import atomic_file


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float NHWC -> uint8 NHWC with 3 channels ((x+1)*127.5, clamped, truncated)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be NHWC with 1 or 3 channels, got shape {images.shape}')
  out = np.clip((images + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def grid_image(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one [rows*H, cols*W, 3] image (2-pixel white gutters)."""
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  gap = 2
  grid = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = img
  return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
  """A grid image file (format from the suffix, e.g. .png), local or on object storage."""
  from PIL import Image

  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ValueError(f'{path}: unknown image file suffix (expected e.g. .png)')
  with atomic_file(path) as f:
    Image.fromarray(grid_image(images, ncols)).save(f, format=fmt)
  return path
