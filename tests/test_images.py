"""Grids of images: the plain grid and the labelled one (one row per class, enlarged)."""

import numpy as np
import pytest
from PIL import Image

from mdt_jax import images


def tiles_of(n, size=4, seed=0):
  """n distinct mid-gray tiles (no pure white or black pixels), one flat value each."""
  values = np.linspace(40, 215, n).astype(np.uint8)
  out = np.repeat(values[:, None, None, None], size * size * 3, axis=1)
  return out.reshape(n, size, size, 3)


def test_labelled_grid_has_one_row_per_class_in_order_with_its_label():
  x = tiles_of(7)
  y = np.array([3, 1, 3, 1, 1, 7, 3])
  scale, tile = 3, 4 * 3
  grid = images.labelled_grid(x, y, scale)
  ncols, nrows = 3, 3  # classes 1, 3, 7; class 1 and 3 have three samples each
  width_tiles = ncols * (tile + 2) - 2
  assert grid.shape[0] == nrows * (tile + 2) - 2
  label_w = grid.shape[1] - width_tiles
  assert label_w > 0
  body = grid[:, label_w:]
  for r, c in enumerate([1, 3, 7]):
    want = x[y == c]
    for k in range(ncols):
      cell = body[r * (tile + 2) : r * (tile + 2) + tile, k * (tile + 2) : k * (tile + 2) + tile]
      if k < len(want):  # each pixel drawn scale x scale: a flat tile stays flat
        np.testing.assert_array_equal(cell, np.broadcast_to(want[k, 0, 0], cell.shape))
      else:
        assert (cell == 255).all()  # an empty slot is white
    # the row's label: dark text in the label column, beside its row only
    band = grid[r * (tile + 2) : r * (tile + 2) + tile, :label_w]
    assert (band < 128).any()
  gutters = grid[tile :: tile + 2, :label_w]
  assert (gutters == 255).all()


def test_labels_differ_in_the_picture():
  x = tiles_of(2)
  grid = images.labelled_grid(x, np.array([1, 7]), 4)
  tile = 16
  label_w = grid.shape[1] - tile
  first, second = grid[:tile, :label_w], grid[tile + 2 :, :label_w]
  assert not np.array_equal(first, second)  # '1' and '7' are drawn, not a fixed mark


def test_save_grid_with_labels_writes_the_labelled_picture(tmp_path):
  x, y = tiles_of(4), np.array([0, 1, 0, 1])
  path = images.save_grid(x, str(tmp_path / 'g.png'), labels=y, scale=2)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), images.labelled_grid(x, y, 2))


def test_bad_grid_inputs_are_refused():
  x = tiles_of(3)
  with pytest.raises(
      ValueError,
      match=r'N labels; got uint8 images of shape \(3, 4, 4, 3\) and labels of shape \(2,\)',
  ):
    images.labelled_grid(x, np.array([0, 1]), 1)
  with pytest.raises(ValueError, match='grid scale must be a positive integer, got 0'):
    images.labelled_grid(x, np.array([0, 1, 2]), 0)
