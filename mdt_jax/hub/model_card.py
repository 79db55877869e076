"""The model card of an exported model folder: ``README.md``, whose YAML metadata
``huggingface_hub.ModelCard`` parses back (license, library_name, tags, datasets, pipeline_tag and,
given an evaluation JSON, model-index results), and the markdown body (model, training, sampling,
evaluation, usage, files, citation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from mdt_jax import paths
from mdt_jax.diffusion import objective_of
from mdt_jax.diffusion.objectives import flow_matching
from mdt_jax.hub.official import constructor_call
from mdt_jax.models.mdt import MDTConfig
from mdt_jax.models.params import count_params

LIBRARY_NAME = 'mdt_jax'
# The Hub has no class-conditional generation task; class-conditional image models (DiT, MAR,
# MDT) are listed under this one, with a tag saying they are class-conditional.
PIPELINE_TAG = 'unconditional-image-generation'
CARD_FILE = 'README.md'
# License identifiers the Hub knows ('other' needs license_name and license_link).
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail openrail++ bigscience-openrail-m creativeml-openrail-m
    bigscience-bloom-rail-1.0 bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause
    bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0
    cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
    cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0
    etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc
    lppl-1.3c ms-pl mpl-2.0 odc-by odbl osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl
    lgpl-lr unknown other""".split())

# Hub dataset ids and card names of the training data (data.name of the training config).
DATASETS = {
    'latents': dict(hub_id='ILSVRC/imagenet-1k', type='imagenet-1k', name='ImageNet'),
    'digits': dict(
        hub_id=None,
        type='digits',
        name='scikit-learn digits (UCI optical recognition of handwritten digits)',
    ),
}


@dataclasses.dataclass(frozen=True)
class Metric:
  """One metric of the evaluation JSON and how the model card reports it."""

  keys: tuple[str, ...]  # accepted names in the JSON, first match wins
  type: str  # model-index metric type
  name: str  # shown name
  lower_is_better: bool


# `python -m mdt_jax.evaluate --out` writes fid, sfid, inception_score, precision, recall and
# num_samples; the other names are accepted for files written by other evaluators.
EVAL_METRICS = (
    Metric(('fid', 'FID', 'fid50k'), 'fid', 'FID', True),
    Metric(('sfid', 'sFID', 'SFID'), 'sfid', 'sFID', True),
    Metric(('inception_score', 'is', 'IS'), 'inception_score', 'Inception Score', False),
    Metric(('precision', 'Precision'), 'precision', 'Precision', False),
    Metric(('recall', 'Recall'), 'recall', 'Recall', False),
)


# ---------------------------------------------------------------------------- evaluation results


def read_evaluation(path: str) -> dict[str, Any]:
  """The metrics of an evaluation JSON: {'metrics': [(Metric, value)], 'num_samples', ...}.

  Missing and null metrics are skipped; a value that is not a finite number is an error. Metrics
  may sit at the top level or under "metrics".
  """
  if not paths.path(path).is_file():
    raise FileNotFoundError(f'evaluation JSON {path} does not exist')
  try:
    raw = json.loads(paths.path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'evaluation JSON {path} is not valid JSON: {e}') from e
  if not isinstance(raw, dict):
    raise ValueError(f'evaluation JSON {path} must hold an object, got {type(raw).__name__}')
  source = raw['metrics'] if isinstance(raw.get('metrics'), dict) else raw
  found = []
  for m in EVAL_METRICS:
    key = next((k for k in m.keys if k in source), None)
    if key is None or source[key] is None:
      continue
    value = source[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(
          f'evaluation JSON {path}: {key!r} must be a finite number or null, got {value!r}'
      )
    found.append((m, float(value)))
  if not found:
    names = ', '.join(m.keys[0] for m in EVAL_METRICS)
    raise ValueError(
        f'evaluation JSON {path} holds none of the metrics {names} '
        f'(keys found: {sorted(source)})'
    )
  num = raw.get('num_samples')
  return dict(
      metrics=found,
      num_samples=int(num) if isinstance(num, (int, float)) else None,
      reference=raw.get('reference'),
      path=path,
  )


def eval_results(
    evaluation: Mapping[str, Any],
    dataset: Mapping[str, Any],
    image_size: int,
    class_conditional: bool,
) -> list:
  """huggingface_hub EvalResult entries (the card's model-index) of `read_evaluation`'s output."""
  from huggingface_hub import EvalResult

  n = evaluation.get('num_samples')
  suffix = f' ({n} samples)' if n else ''
  task_name = (
      'Class-conditional image generation'
      if class_conditional
      else 'Unconditional image generation'
  )
  return [
      EvalResult(
          task_type=PIPELINE_TAG,
          task_name=task_name,
          dataset_type=dataset['type'],
          dataset_name=f'{dataset["name"]} {image_size}x{image_size}',
          metric_type=m.type,
          metric_name=m.name + suffix,
          metric_value=round(v, 4),
      )
      for m, v in evaluation['metrics']
  ]


# ------------------------------------------------------------------------------------ model card


def _dataset_info(data_cfg: Mapping[str, Any], dataset_id: str | None) -> dict:
  info = dict(
      DATASETS.get(
          data_cfg.get('name'),
          dict(hub_id=None, type=str(data_cfg.get('name')), name=str(data_cfg.get('name'))),
      )
  )
  if dataset_id:
    info.update(hub_id=dataset_id, type=dataset_id)
  return info


def check_license(license: str, license_name: str | None, license_link: str | None) -> None:
  if license not in HUB_LICENSES:
    raise ValueError(
        f'license {license!r} is not a Hub license identifier (e.g. apache-2.0, '
        'mit, cc-by-nc-4.0); use license "other" with a license name and link'
    )
  if license == 'other' and not (license_name and license_link):
    raise ValueError('license "other" needs license_name and license_link')


def card_metadata(
    *,
    config: MDTConfig,
    data_cfg: Mapping[str, Any],
    license: str,
    model_name: str,
    evaluation: Mapping[str, Any] | None = None,
    dataset_id: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
    extra_tags: Sequence[str] = (),
):
  """The card's YAML metadata as a huggingface_hub.ModelCardData."""
  from huggingface_hub import ModelCardData

  check_license(license, license_name, license_link)
  ds = _dataset_info(data_cfg, dataset_id)
  conditional = config.num_classes > 0
  tags = [
      LIBRARY_NAME,
      'jax',
      'flax',
      'diffusion',
      'image-generation',
      'masked-diffusion-transformer',
      'mdtv2' if config.arch == 'mdtv2' else 'mdt',
  ]
  tags.append('class-conditional-image-generation' if conditional else 'unconditional')
  tags += list(extra_tags)
  results = None
  if evaluation:
    results = eval_results(
        evaluation, ds, int(data_cfg.get('image_size', config.input_size)), conditional
    )
  return ModelCardData(
      license=license,
      license_name=license_name if license == 'other' else None,
      license_link=license_link if license == 'other' else None,
      library_name=LIBRARY_NAME,
      pipeline_tag=PIPELINE_TAG,
      tags=tags,
      datasets=[ds['hub_id']] if ds['hub_id'] else None,
      metrics=[m.type for m, _ in evaluation['metrics']] if evaluation else None,
      model_name=model_name,
      eval_results=results,
  )


def usage_code(model_ref: str, space: str, num_classes: int) -> str:
  """Python that loads the model (folder or Hub id) and samples with the recommended settings."""
  n = max(1, min(num_classes, 4))
  lines = [
      'import numpy as np',
      'from mdt_jax.hub import load, sampler_config',
      'from mdt_jax.sampling import build_sampler, generate',
      'from mdt_jax.images import save_grid, to_uint8',
      '',
      '# a model folder or a Hub repo id (downloaded once, then read from the cache offline)',
      f'pretrained = load({model_ref!r})',
      'config = sampler_config(pretrained)   # recommended settings; keyword arguments change them',
      'sampler = build_sampler(pretrained.model, config)   # shards the batch over local devices',
      f'labels = np.repeat(np.arange({n}), 2)   # 2 samples each of classes 0..{n - 1}',
      'samples = generate(sampler, labels, seed=0, batch_size=8)   # NHWC float32',
  ]
  if space == 'pixel':
    lines += [
        'images = to_uint8(samples)   # [-1, 1] pixels -> uint8',
        "save_grid(images, 'samples.png', ncols=8)",
        "print('wrote samples.png', images.shape)",
    ]
  else:
    lines += [
        "np.save('latents.npy', samples)   # decode with the VAE named in config.json",
        "print('wrote latents.npy', samples.shape)",
    ]
  return '\n'.join(lines)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
  return '\n'.join(['| setting | value |', '|---|---|'] + [f'| {k} | `{v}` |' for k, v in rows])


def card_text(
    *,
    metadata,
    config: MDTConfig,
    model_ref: str,
    title: str,
    data: Mapping,
    diffusion: Mapping,
    sampling: Mapping,
    training: Mapping,
    evaluation: Mapping | None,
    official_files: Sequence[str],
) -> str:
  """The whole README.md: YAML metadata block + markdown body."""
  arch = 'MDTv2' if config.arch == 'mdtv2' else 'MDT (v1)'
  space = data.get('space', 'latent')
  what = (
      f'{data.get("image_size")}x{data.get("image_size")} images through the VAE latents '
      f'({config.input_size}x{config.input_size}x{config.in_channels}, decoder '
      f'`{data.get("vae")}`)'
      if space == 'latent'
      else f'{config.input_size}x{config.input_size}x{config.in_channels} pixels'
  )
  cond = (
      f'class-conditional ({config.num_classes} classes, classifier-free guidance)'
      if config.num_classes > 0
      else 'unconditional'
  )
  parts = [
      f'# {title}',
      '',
      f'An {arch} (Masked Diffusion Transformer) trained with mdt_jax '
      f'(MDTv2 in JAX / Flax NNX): {cond}, generating {what}.',
      '',
      '## Model',
      '',
      _table(
          [
              ('architecture', config.arch),
              ('parameters', f'{count_params(config):,}'),
              ('depth (decoder layers)', f'{config.depth} ({config.decode_layer})'),
              ('hidden size / heads', f'{config.hidden_size} / {config.num_heads}'),
              ('patch size', config.patch_size),
              ('input', what),
              ('learned variance', config.learn_sigma),
          ]
      ),
      '',
      '## Training',
      '',
      _table(list(training.items())),
      '',
      '## Diffusion and recommended sampling',
      '',
      _table(
          [(f'diffusion.{k}', v) for k, v in diffusion.items()]
          + [(f'sampling.{k}', v) for k, v in sampling.items()]
      ),
      '',
  ]
  if evaluation:
    details = [f'{evaluation["num_samples"]} samples'] if evaluation.get('num_samples') else []
    if evaluation.get('reference'):
      details.append(f'reference `{os.path.basename(str(evaluation["reference"]))}`')
    parts += [
        '## Evaluation',
        '',
        f'From `{os.path.basename(evaluation["path"])}`'
        + (f' ({", ".join(details)})' if details else '')
        + ':',
        '',
        '| metric | value |',
        '|---|---|',
    ]
    parts += [
        f'| {m.name} ({"lower" if m.lower_is_better else "higher"} is better) | {v:.4f} |'
        for m, v in evaluation['metrics']
    ]
    parts.append('')
  parts += [
      '## Usage',
      '',
      'Install mdt_jax from its repository (`pip install -e .` in a checkout), then:',
      '',
      '```python',
      usage_code(model_ref, space, config.num_classes),
      '```',
      '',
      "Or from the command line (writes the ADM evaluator's `.npz` and a grid):",
      '',
      '```bash',
      f'python -m mdt_jax.sample --model={model_ref} --num_samples=64 --out=samples'
      + ('' if space == 'pixel' else ' --vae=VAE_FOLDER'),
      '```',
      '',
  ]
  if official_files:
    files = ', '.join(f'`{f}`' for f in official_files)
    parts += [
        '## Official PyTorch layout',
        '',
        f'{files} hold the same weights under the key names and layouts of the original code '
        '(github.com/sail-sg/MDT), `relative_position_index` buffers included, so they load with '
        f'strict key matching into `{constructor_call(config)}`, e.g. '
        '`model.load_state_dict(safetensors.torch.load_file(path), strict=True)` or '
        '`model.load_state_dict(torch.load(path))`. `tools/convert_official.py` converts them '
        'back.',
        '',
    ]
  parts += [
      '## Files',
      '',
      '- `model.safetensors`: float32 parameters under mdt_jax names '
      '(nnx parameter paths joined by dots)',
      '- `config.json`: model hyperparameters, data space, diffusion and recommended sampling '
      'settings',
      '',
      '## Citation',
      '',
      '```bibtex',
      '@inproceedings{gao2023masked,',
      '  title={Masked Diffusion Transformer is a Strong Image Synthesizer},',
      '  author={Gao, Shanghua and Zhou, Pan and Cheng, Ming-Ming and Yan, Shuicheng},',
      '  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision},',
      '  year={2023}',
      '}',
      '```',
      '',
  ]
  return f'---\n{metadata.to_yaml()}\n---\n\n' + '\n'.join(parts)


def parse_card(text: str):
  """Parse a card with huggingface_hub's own ModelCard (strict: metadata errors raise)."""
  from huggingface_hub import ModelCard

  card = ModelCard(text, ignore_metadata_errors=False)
  data = card.data
  missing = [k for k in ('license', 'library_name', 'pipeline_tag', 'tags') if not data.get(k)]
  if missing:
    raise ValueError(f'model card metadata lacks {missing}')
  check_license(data.license, data.get('license_name'), data.get('license_link'))
  return card


# ------------------------------------------------------------------------------ training summary


def _mask_ratio(model) -> str | None:
  lo, span = model.get('mask_ratio'), model.get('mask_ratio_span', 0.0)
  if lo is None:
    return None
  return f'U[{lo}, {lo + span})' if span else f'{lo}'


def training_summary(config, step: int, weights: str) -> dict:
  opt = config.optimizer
  return {
      'steps': step,
      'weights': 'EMA' if weights == 'ema' else 'raw (not EMA)',
      'EMA decay': config.ema_decay,
      'global batch size': config.global_batch_size,
      'optimizer': f'{opt.name}, lr {opt.learning_rate}, clip {opt.get("clip_norm")}',
      'masked branch': config.mask_branch,
      'mask ratio': _mask_ratio(config.model),
      **_objective_summary(config.diffusion),
      'data': config.data.name,
  }


def _objective_summary(diffusion) -> dict:
  if objective_of(diffusion) == 'flow':
    fm = flow_matching(diffusion)
    times = (
        fm.t_sampling
        if fm.t_sampling == 'uniform'
        else f'logit-normal({fm.t_logit_mean}, {fm.t_logit_scale})'
    )
    return {
        'objective': 'flow matching (velocity MSE)',
        'training times': times + (f', shift {fm.t_shift}' if fm.t_shift != 1 else ''),
    }
  return {'loss weighting': f'min-SNR-{diffusion.get("min_snr_gamma")}'}
