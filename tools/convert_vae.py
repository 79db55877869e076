"""Import a diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema) as a VAE folder.

    python tools/convert_vae.py --diffusers_dir DIR --out VAE_DIR

DIR holds config.json and diffusion_pytorch_model.safetensors; torch is not needed. VAE_DIR gets
config.json and model.safetensors, read back by ``mdt_jax.vae.load(VAE_DIR)``. A folder whose keys
or shapes do not match its config is refused with the keys named, and nothing is written.
"""

from absl import app, flags

from mdt_jax import errors, paths
from mdt_jax.vae import convert

flags.DEFINE_string('diffusers_dir', None, 'diffusers-format AutoencoderKL folder', required=True)
flags.DEFINE_string('out', None, 'output VAE folder', required=True)
flags.DEFINE_bool('overwrite', False, 'replace --out if it exists')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  src = paths.require_local(
      FLAGS.diffusers_dir, '--diffusers_dir', 'the diffusers folder is read from a local disk'
  )
  out = convert(src, paths.resolve(FLAGS.out), overwrite=FLAGS.overwrite)
  print(f'wrote {out}')


if __name__ == '__main__':
  errors.run(main)
