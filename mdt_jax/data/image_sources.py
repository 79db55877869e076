"""The images that latent extraction encodes: a folder of image files or a prepared TFDS
dataset, as random-access sources of (PIL image, label), and the ADM preprocessing (RGB, centre
crop) applied to each image before encoding."""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'gif')  # the ADM loader's list


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """ADM centre crop: halve with BOX while the short side >= 2*size, BICUBIC to short side
  `size`, crop the centre. Returns uint8 [size, size, C]."""
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top : top + size, left : left + size]


def preprocess(image: Image.Image, size: int) -> np.ndarray:
  """RGB, ADM centre crop; uint8 [size, size, 3] (scaled to [-1, 1] on the device)."""
  image.load()
  return center_crop_arr(image.convert('RGB'), size)


@dataclasses.dataclass
class ImageSource:
  """Random-access images: ``load(i)`` -> (PIL image, label), which may raise on a bad image."""

  keys: Callable[[int], str]
  load: Callable[[int], tuple[Image.Image, int]]
  size: int
  class_names: list[str]
  description: dict[str, Any]

  def __len__(self) -> int:
    return self.size


def folder_source(root: str, label_from: str = 'folder') -> ImageSource:
  """Images under `root` (extensions as ADM: jpg, jpeg, png, gif), listed recursively, sorted.

  The class is the sub-folder directly under `root` (``label_from='folder'``) or the file-name
  prefix before the first '_' (``'prefix'``, as the ADM loader does); label = index in the sorted
  list of class names.
  """
  if label_from not in ('folder', 'prefix'):
    raise ValueError(f"label_from must be 'folder' or 'prefix', got {label_from!r}")
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root!r} does not exist or is not a folder')
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in filenames:
      if '.' in name and name.rsplit('.', 1)[1].lower() in IMAGE_EXTENSIONS:
        files.append(os.path.relpath(os.path.join(dirpath, name), root))
  files.sort()
  if not files:
    raise ValueError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {root!r}')
  if label_from == 'folder':
    loose = [f for f in files if os.sep not in f]
    if loose:
      raise ValueError(
          f'{len(loose)} images lie directly in {root!r} (e.g. {loose[:3]}), not in '
          "a class sub-folder; move them or use label_from='prefix'"
      )
    classes = [f.split(os.sep, 1)[0] for f in files]
  else:
    classes = [os.path.basename(f).split('_', 1)[0] for f in files]
  class_names = sorted(set(classes))
  index = {c: i for i, c in enumerate(class_names)}
  labels = [index[c] for c in classes]

  def load(i):
    with open(os.path.join(root, files[i]), 'rb') as f:
      return Image.open(io.BytesIO(f.read())), labels[i]

  return ImageSource(
      keys=files.__getitem__,
      load=load,
      size=len(files),
      class_names=class_names,
      description={'source': 'folder', 'root': os.path.abspath(root), 'label_from': label_from},
  )


def tfds_source(
    name: str = 'imagenet2012', split: str = 'train', data_dir: str | None = None
) -> ImageSource:
  """A prepared TFDS dataset (array_record file format) through ``tfds.data_source``.

  Images are read as the stored bytes and decoded with PIL, as the ADM loader decodes files.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError('the TFDS source needs tensorflow-datasets (see requirements.txt)') from e
  try:
    ds = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={'image': tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # tfds raises several types for a missing / unprepared dataset
    raise FileNotFoundError(
        f'cannot open TFDS dataset {name!r} split {split!r} in data_dir {data_dir!r} '
        f'(it must be prepared in array_record format): {e}'
    ) from e
  if len(ds) == 0:
    raise ValueError(f'TFDS dataset {name!r} split {split!r} in {data_dir!r} is empty')
  class_names = list(ds.dataset_info.features['label'].names)

  def key(i):
    return f'{name}/{split}[{i}]'

  def load(i):
    ex = ds[i]
    img = ex['image']
    if isinstance(img, (bytes, np.bytes_)):
      img = Image.open(io.BytesIO(img))
    else:
      img = Image.fromarray(np.asarray(img))
    return img, int(ex['label'])

  return ImageSource(
      keys=key,
      load=load,
      size=len(ds),
      class_names=class_names,
      description={
          'source': 'tfds',
          'name': name,
          'split': split,
          'data_dir': os.path.abspath(data_dir) if data_dir else None,
      },
  )
