"""The quickstart dataset: scikit-learn's bundled handwritten digits (1,797 images, 10 classes).

It ships inside the scikit-learn wheel, so the quickstart runs offline. The 8x8 images (16 grey
levels) are upsampled bilinearly to ``size`` x ``size`` and scaled to [-1, 1], NHWC, 1 channel.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

NUM_CLASSES = 10
SPLITS = ('all', 'train', 'test')
SPLIT_SEED = 0  # one fixed train / test split for every user (classifier, studies)
TEST_FRACTION = 0.2


def split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The fixed (train, test) index split of the n images (test: 20%, sorted indices)."""
  perm = np.random.default_rng(SPLIT_SEED).permutation(n)
  n_test = int(round(n * TEST_FRACTION))
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def select_split(
    images: np.ndarray, labels: np.ndarray, split: str = 'all'
) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of one split: 'all', 'train' (80%) or 'test' (the held-out 20%)."""
  if split not in SPLITS:
    raise ValueError(f'digits split must be one of {SPLITS}, got {split!r}')
  if split == 'all':
    return images, labels
  idx = split_indices(len(labels))[0 if split == 'train' else 1]
  return images[idx], labels[idx]


def _digits_8x8() -> tuple[np.ndarray, np.ndarray]:
  """The 8x8 images (values 0-16, float64 [N, 8, 8]) and labels, as scikit-learn's
  ``load_digits`` gives them. Read straight from the file it ships (``datasets/data/
  digits.csv.gz``: 64 pixels then the label per row): importing scikit-learn costs about a
  second of every training process's start. Another layout of the wheel falls back to it."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None:
    raise ImportError(
        "the quickstart's digits dataset ships with scikit-learn: pip install scikit-learn"
    )
  path = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', 'digits.csv.gz')
  if not os.path.isfile(path):
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target
  rows = np.loadtxt(path, delimiter=',')
  return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)


def load_digits_images(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images float32 [N, size, size, 1] in [-1, 1], labels int32 [N])."""
  if size < 8:
    raise ValueError(f'digits image size must be >= 8, got {size}')
  images, labels = _digits_8x8()
  imgs = _resize(images.astype(np.float32) / 16.0, size)  # [N, 8, 8] in [0, 1]
  imgs = imgs * 2.0 - 1.0
  return imgs[..., None].astype(np.float32), labels.astype(np.int32)


def _resize(imgs: np.ndarray, size: int) -> np.ndarray:
  """float32 [N, h, w] in [0, 1] -> [N, size, size]: bilinear (PIL), clipped to [0, 1]."""
  from PIL import Image

  if imgs.shape[1:] != (size, size):
    imgs = np.stack(
        [
            np.asarray(Image.fromarray(im, mode='F').resize((size, size), Image.BILINEAR))
            for im in imgs
        ]
    )
  return np.clip(imgs, 0.0, 1.0)


def upsample(images: np.ndarray, size: int) -> np.ndarray:
  """Images of the dataset's 8x8 resolution (float [N, 8, 8, 1] in [-1, 1]) at ``size`` x
  ``size`` as ``load_digits_images(size)`` makes its images from the 8x8 originals (bilinear,
  clipped): an 8x8 sample upsampled here is what the dataset at ``size`` would hold for it."""
  x = (np.clip(np.asarray(images, np.float32)[..., 0], -1.0, 1.0) + 1.0) / 2.0
  return (_resize(x, size) * 2.0 - 1.0)[..., None].astype(np.float32)
