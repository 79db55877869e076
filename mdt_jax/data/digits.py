"""The quickstart dataset: scikit-learn's bundled handwritten digits (1,797 images, 10 classes).

It ships inside the scikit-learn wheel, so the quickstart runs offline. The 8x8 images (16 grey
levels) are upsampled bilinearly to ``size`` x ``size`` and scaled to [-1, 1], NHWC, 1 channel.
"""
from __future__ import annotations

import numpy as np

NUM_CLASSES = 10


def load_digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images float32 [N, size, size, 1] in [-1, 1], labels int32 [N])."""
  from sklearn.datasets import load_digits
  from PIL import Image

  if size < 8:
    raise ValueError(f'digits image size must be >= 8, got {size}')
  data = load_digits()
  imgs = data.images.astype(np.float32) / 16.0          # [N, 8, 8] in [0, 1]
  if size != 8:
    imgs = np.stack([np.asarray(Image.fromarray(im, mode='F').resize((size, size),
                                                                     Image.BILINEAR))
                     for im in imgs])
  imgs = np.clip(imgs, 0.0, 1.0) * 2.0 - 1.0
  return imgs[..., None].astype(np.float32), data.target.astype(np.int32)
