"""A stand-in for DINOv2 on the digits: a small ViT of the DINOv2 architecture, trained as a
classifier on the digits' fixed 80% split, its backbone saved as a DINOv2 folder.

It is independent of the evaluation classifier (``mdt_jax.evaluation.digits_classifier``, a CNN):
another architecture, other weights, its own training. It sees the images as the REPA teacher
is fed them (``mdt_jax.training.align.repa_targets``: grey repeated to RGB, ImageNet-normalised,
at 16 px here), a linear head on the mean of its patch tokens. A supervised ViT of 16 patches is
not a self-supervised ImageNet encoder: it only stands in for one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mdt_jax.data.digits import load_digits_images, split_indices
from mdt_jax.models import dinov2
from mdt_jax.models.params import param_name

SIZE = 16


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  seed: int = 0
  hidden_size: int = 64
  layers: int = 4
  heads: int = 4
  patch_size: int = 4  # a 4 x 4 grid at 16 px: the quickstart's S/4 tokens
  epochs: int = 40
  batch_size: int = 128
  learning_rate: float = 1e-3

  def architecture(self) -> dinov2.Dinov2Config:
    return dinov2.Dinov2Config(
        hidden_size=self.hidden_size,
        num_hidden_layers=self.layers,
        num_attention_heads=self.heads,
        image_size=SIZE,
        patch_size=self.patch_size,
    )


class Classifier(nnx.Module):

  def __init__(self, config: TeacherConfig, *, rngs: nnx.Rngs):
    self.backbone = dinov2.Dinov2(config.architecture(), rngs=rngs)
    self.head = nnx.Linear(config.hidden_size, 10, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    rgb = jnp.repeat(images, 3, axis=-1)
    tokens = self.backbone.patch_tokens(dinov2.normalize(rgb, None))
    return self.head(tokens.mean(axis=1))


def train(config: TeacherConfig = TeacherConfig()) -> tuple[Classifier, float]:
  """Trained on the fixed 80% split; (model, accuracy on the held-out 20%)."""
  images, labels = load_digits_images(SIZE)
  train_idx, test_idx = split_indices(len(images))
  graphdef, params = nnx.split(Classifier(config, rngs=nnx.Rngs(config.seed)), nnx.Param)
  tx = optax.adamw(config.learning_rate, weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  order = np.random.default_rng(config.seed)
  steps = len(train_idx) // config.batch_size
  for _ in range(config.epochs):
    perm = train_idx[order.permutation(len(train_idx))]
    for i in range(steps):
      idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
      params, opt_state = step(params, opt_state, images[idx], labels[idx])
  model = nnx.merge(graphdef, params)
  logits = jax.jit(lambda x: model(x))(images[test_idx])
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[test_idx]))
  return model, accuracy


def save_backbone(model: Classifier, out_dir: str, accuracy: float, overwrite: bool = False) -> str:
  """The trained ViT as a DINOv2 folder (``mdt_jax.models.dinov2.load`` reads it)."""
  params = {
      param_name(p): np.asarray(v[...], np.float32)
      for p, v in nnx.to_flat_state(nnx.state(model.backbone, nnx.Param))
  }
  source = f'digits stand-in teacher: ViT trained on the digits train split, test accuracy {accuracy:.4f}'
  return dinov2.save(out_dir, model.backbone.config, params, source=source, overwrite=overwrite)
