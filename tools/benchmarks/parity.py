"""Does a fast compute setting give the same training signal? (``tools/bench.py --parity``)

Before trusting a fast path on a new machine (cuDNN's fused attention, bfloat16, a padded mask
buffer, rematerialisation), compare it with a reference setting of the same model: the same
float32 weights, the same batch, the same draws (timesteps, noise, label dropout, masks), the
training loss of both branches and its gradient with respect to every parameter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mdt_jax.configs_base import model_of
from mdt_jax.models import platform
from mdt_jax.models.mdt import COMPUTE_OPTIONS, MDT, MDTConfig
from mdt_jax.models.params import abstract_model, param_name
from mdt_jax.training.step import loss_fn, loss_settings


def parse_overrides(spec: str) -> dict:
  """'attention_impl=xla,dtype=float32' -> {'attention_impl': 'xla', 'dtype': 'float32'}.

  Values are read as bool (true/false), int, float or else string; 'none' is None.
  """
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(','))):
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'parity setting {item!r} is not of the form field=value (in {spec!r})')
    out[key.strip()] = _literal(value.strip())
  if not out:
    raise ValueError(f'parity spec {spec!r} names no field=value')
  check_fields(out)
  return out


def check_fields(reference: dict) -> None:
  """Refuse a reference setting that names anything but compute options (COMPUTE_OPTIONS)."""
  known = {f.name for f in dataclasses.fields(MDTConfig)}
  unknown = sorted(set(reference) - known)
  if unknown:
    raise ValueError(
        f'parity: unknown model fields {unknown}; expected some of {sorted(COMPUTE_OPTIONS)}'
    )
  # A field outside the compute options may keep every shape (mask_ratio) yet change what is
  # computed: the comparison would report a difference that is no error of the computation.
  other = sorted(set(reference) - set(COMPUTE_OPTIONS))
  if other:
    raise ValueError(
        f'parity: {other} are not compute options; a parity check compares the '
        f'compute settings ({", ".join(COMPUTE_OPTIONS)}) of one model'
    )


def _literal(value: str):
  low = value.lower()
  if low in ('true', 'false'):
    return low == 'true'
  if low == 'none':
    return None
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def _loss_and_grads(graphdef, config: ml_collections.ConfigDict):
  fn = functools.partial(loss_fn, graphdef=graphdef, **loss_settings(config))
  grads = jax.value_and_grad(lambda p, b, k: fn(p, batch=b, key=k), has_aux=True)
  # compiled for the default device: only its platform's branches traced
  return jax.jit(platform.traced_for(jax.devices()[:1], grads))


def fill_zero_weights(params, key, std: float = 0.02):
  """Draw N(0, std) into every all-zero leaf. At init adaLN-Zero and the zero final layer make
  the output 0 whatever the compute, so a comparison there would test nothing but the backward."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  leaves = [
      std * jax.random.normal(k, x.shape, x.dtype) if not np.any(np.asarray(x)) else x
      for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(tree, leaves)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.linalg.norm(b.ravel())
  diff_norm = np.linalg.norm((a - b).ravel())
  return float(diff_norm / scale) if scale > 0 else float(diff_norm)


class Comparison:
  """Loss and gradients of `config.model` on one batch, compared with reference settings."""

  def __init__(self, config: ml_collections.ConfigDict, batch_size: int | None = None):
    self.config = config
    self.fields = config.model.to_dict()
    self.model_cfg = model_of(self.fields)
    mc = self.model_cfg
    params = nnx.to_pure_dict(nnx.state(MDT(mc, rngs=nnx.Rngs(config.seed))))
    self.params = fill_zero_weights(params, jax.random.key(config.seed + 2))
    n = batch_size or config.global_batch_size
    xkey, self.key = jax.random.split(jax.random.key(config.seed + 1))
    shape = (n, mc.input_size, mc.input_size, mc.in_channels)
    self.batch = {
        'x': jax.random.normal(xkey, shape),
        'y': jnp.arange(n, dtype=jnp.int32) % mc.num_classes,
    }
    self.result = self._run(abstract_model(mc))

  def _run(self, abstract: MDT):
    graphdef = nnx.split(abstract)[0]
    (_, metrics), grads = _loss_and_grads(graphdef, self.config)(self.params, self.batch, self.key)
    return jax.device_get(metrics), jax.device_get(grads)

  def against(self, reference: dict) -> dict:
    """Relative differences to the model with `reference`'s fields replaced."""
    check_fields(reference)
    ref_model = abstract_model(model_of(self.fields, **reference))
    metrics, grads = self.result
    ref_metrics, ref_grads = self._run(ref_model)
    names = [param_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    per_param = [_rel(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))]
    worst = int(np.argmax(per_param))
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
    tested = {k: v for k, v in self.fields.items() if k in reference}
    out = {
        'setting': _spec(tested),
        'reference': _spec(reference),
        'loss': float(metrics['loss']),
        'reference_loss': float(ref_metrics['loss']),
        'grad_rel_diff': _rel(flat(grads), flat(ref_grads)),
        'worst_param': names[worst],
        'worst_param_rel_diff': per_param[worst],
    }
    for branch in ('plain', 'masked'):
      key = f'{branch}/loss'
      if key in metrics:
        out[f'{branch}_loss_rel_diff'] = _rel(metrics[key], ref_metrics[key])
    return out


def _spec(fields: dict) -> str:
  return ','.join(f'{k}={v}' for k, v in fields.items())


PARITY_KEYS = [
    'setting',
    'reference',
    'loss',
    'reference_loss',
    'plain_loss_rel_diff',
    'masked_loss_rel_diff',
    'grad_rel_diff',
    'worst_param',
    'worst_param_rel_diff',
]
