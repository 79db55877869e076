"""Import a Hugging Face transformers DINOv2 folder (e.g. facebook/dinov2-base) as a DINOv2 folder.

    python tools/convert_dinov2.py --hf_dir DIR --out DINO_DIR

DIR holds config.json and model.safetensors of a ``Dinov2Model`` or ``Dinov2WithRegistersModel``;
neither torch nor transformers is needed. DINO_DIR gets config.json and model.safetensors, read
back by ``mdt_jax.models.dinov2.load(DINO_DIR)``. A folder of another architecture, or whose keys
or shapes do not match its config, is refused with the keys named, and nothing is written.
"""

from absl import app, flags

from mdt_jax import paths
from mdt_jax.hub import dinov2

flags.DEFINE_string('hf_dir', None, 'transformers DINOv2 folder', required=True)
flags.DEFINE_string('out', None, 'output DINOv2 folder', required=True)
flags.DEFINE_bool('overwrite', False, 'replace --out if it exists')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  src = paths.require_local(
      FLAGS.hf_dir, '--hf_dir', 'the transformers folder is read from a local disk'
  )
  out = dinov2.convert(src, paths.resolve(FLAGS.out), overwrite=FLAGS.overwrite)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
