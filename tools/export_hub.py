r"""Export a training run as a folder ready for the Hugging Face Hub (and upload it).

  python tools/export_hub.py --workdir runs/quickstart --out exports/mdt-digits \
      [--step 2000] [--weights ema|raw] [--eval_json metrics.json] [--official_layout] \
      [--license apache-2.0] [--push_to_hub user/mdt-digits]

Writes model.safetensors + config.json + README.md (model card); --official_layout adds
official/mdt_official.safetensors (and .pt with --official_formats=safetensors,pt) under the
original PyTorch key names. The logic is mdt_jax.hub.export (the card: model_card, the upload: upload).
"""

from absl import app, flags

from mdt_jax import errors, paths
from mdt_jax.hub import export, upload

flags.DEFINE_string('workdir', None, 'training workdir (config.json + checkpoints/)', required=True)
flags.DEFINE_string('out', None, 'folder to write', required=True)
flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
flags.DEFINE_enum('weights', 'ema', sorted(export.WEIGHTS), 'EMA or raw training weights')
flags.DEFINE_string('eval_json', None, 'metrics JSON of `python -m mdt_jax.evaluate --out`')
flags.DEFINE_bool('official_layout', False, 'also write the weights in the official layout')
flags.DEFINE_list('official_formats', ['safetensors'], 'safetensors and/or pt (needs torch)')
flags.DEFINE_string('license', 'apache-2.0', 'Hub license identifier')
flags.DEFINE_string('license_name', None, 'with --license=other: the license name')
flags.DEFINE_string('license_link', None, 'with --license=other: a link to the license text')
flags.DEFINE_string('dataset', None, 'Hub dataset id for the card (default: from the config)')
flags.DEFINE_string('model_name', None, 'card title and model-index name')
flags.DEFINE_string('push_to_hub', None, 'upload to this Hub repo id (user/name)')
flags.DEFINE_bool('private', None, 'create the Hub repo as private')
flags.DEFINE_bool('overwrite', False, 'replace an existing output folder')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  out = export.export_workdir(
      paths.resolve(FLAGS.workdir),
      paths.resolve(FLAGS.out),
      step=FLAGS.step,
      weights=FLAGS.weights,
      eval_json=paths.resolve_optional(FLAGS.eval_json),
      official_layout=FLAGS.official_layout,
      official_formats=FLAGS.official_formats,
      license=FLAGS.license,
      license_name=FLAGS.license_name,
      license_link=FLAGS.license_link,
      repo_id=FLAGS.push_to_hub,
      dataset_id=FLAGS.dataset,
      model_name=FLAGS.model_name,
      overwrite=FLAGS.overwrite,
  )
  print(f'wrote {out}')
  if FLAGS.push_to_hub:
    url = upload.push_to_hub(out, FLAGS.push_to_hub, private=FLAGS.private)
    print(f'uploaded to {url}')


if __name__ == '__main__':
  errors.run(main)
