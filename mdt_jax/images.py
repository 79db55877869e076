"""Image arrays and files: [-1, 1] floats to uint8, grids of images (plain, or one row per class
with its label), grid image files."""

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


def labelled_grid(images: np.ndarray, labels: np.ndarray, scale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, 3] and their class ids -> one row per class, in class order, its id written
  at the left; each pixel drawn ``scale`` x ``scale`` (nearest), so small images can be seen."""
  labels = np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise ValueError(
        f'a labelled grid takes uint8 images [N, H, W, 3] and N labels; got {images.dtype} '
        f'images of shape {images.shape} and labels of shape {labels.shape}'
    )
  if int(scale) < 1:
    raise ValueError(f'grid scale must be a positive integer, got {scale}')
  scale = int(scale)
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  classes = sorted(set(labels.tolist()))
  rows = [images[labels == c] for c in classes]
  ncols = max(len(r) for r in rows)
  blank = np.full((ncols - 1,) + images.shape[1:], 255, np.uint8)
  tiles = np.concatenate([np.concatenate([r, blank])[:ncols] for r in rows])
  grid = grid_image(tiles, ncols)
  return np.concatenate([_label_column(classes, images.shape[1], grid.shape[0]), grid], axis=1)


def _label_column(classes: list, tile: int, height: int) -> np.ndarray:
  """A white column with each class id centred on its row of tiles (2-pixel gutters)."""
  from PIL import Image, ImageDraw, ImageFont

  font = ImageFont.load_default(size=max(10, tile // 2))
  texts = [str(c) for c in classes]
  width = max(font.getbbox(t)[2] for t in texts) + 2 * max(4, tile // 6)
  panel = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(panel)
  for i, text in enumerate(texts):
    centre = (width // 2, i * (tile + 2) + tile // 2)
    draw.text(centre, text, fill=(0, 0, 0), font=font, anchor='mm')
  return np.asarray(panel)


def save_grid(
    images: np.ndarray,
    path: str,
    ncols: int | None = None,
    labels: np.ndarray | None = None,
    scale: int = 1,
) -> str:
  """A grid image file (format from the suffix, e.g. .png), local or on object storage; with
  ``labels``, one row per class with its label (``labelled_grid``)."""
  from PIL import Image

  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ValueError(f'{path}: unknown image file suffix (expected e.g. .png)')
  if labels is not None:
    grid = labelled_grid(images, labels, scale)
  else:
    grid = grid_image(images, ncols)
  with atomic_file(path) as f:
    Image.fromarray(grid).save(f, format=fmt)
  return path
