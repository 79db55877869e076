"""Convert an official MDT / MDTv2 PyTorch checkpoint into a model folder.

  python tools/convert_official.py --checkpoint mdt_xl2_v2_ckpt.pt --out models/mdtv2_xl2

The checkpoint is a torch.save'd state dict (.pt, needs torch) or the same state dict as
.safetensors (read without torch), e.g. official/mdt_official.safetensors of an export.

Every hyperparameter is inferred from the key names and shapes; v1 checkpoints need
--decode_layer if it is not the released value (2).
"""

from absl import flags

from mdt_jax import errors, paths
from mdt_jax.hub.convert import convert_official

flags.DEFINE_string('checkpoint', None, 'official state dict (.pt or .safetensors)', required=True)
flags.DEFINE_string('out', None, 'model folder to write', required=True)
flags.DEFINE_integer('decode_layer', None, 'override (only v1 needs it: the keys do not say)')
flags.DEFINE_bool('overwrite', False, 'replace an existing folder')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  overrides = {} if FLAGS.decode_layer is None else {'decode_layer': FLAGS.decode_layer}
  src = paths.require_local(
      FLAGS.checkpoint,
      '--checkpoint',
      'torch and safetensors read the official file from a local disk',
  )
  out = convert_official(src, paths.resolve(FLAGS.out), FLAGS.overwrite, **overrides)
  print(f'wrote {out}')


if __name__ == '__main__':
  errors.run(main)
