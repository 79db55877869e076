"""Upload of an exported model folder to the Hugging Face Hub (``huggingface_hub`` is needed only
here, and imported when used)."""

from __future__ import annotations

import os
from typing import Any

from mdt_jax import paths
from mdt_jax.atomic import MARKER, require_complete
from mdt_jax.hub.folder import is_model_folder
from mdt_jax.hub.model_card import CARD_FILE, LIBRARY_NAME, parse_card


def check_repo_id(repo_id: str) -> None:
  from huggingface_hub.utils import HFValidationError, validate_repo_id

  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    raise ValueError(f'{repo_id!r} is not a valid Hub repo id (expected "user/name"): {e}') from e
  if repo_id.count('/') != 1:
    raise ValueError(f'{repo_id!r} is not a valid Hub repo id: expected "user/name"')


def push_to_hub(
    folder: str,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
  """Create the repo if needed and upload the folder; return the repo URL."""
  import huggingface_hub  # optional: only pushing needs it

  check_repo_id(repo_id)
  if not is_model_folder(folder):
    raise FileNotFoundError(f'{folder} is not a model folder (config.json + model.safetensors)')
  require_complete(folder, 'model folder')
  card_path = paths.path(folder) / CARD_FILE
  if not card_path.is_file():
    raise FileNotFoundError(f'{folder} has no {CARD_FILE} model card; export it first')
  parse_card(card_path.read_text())
  api = api or huggingface_hub.HfApi(token=token)
  url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
  # huggingface_hub uploads local files: a folder on object storage is copied down first
  with paths.local_folder(folder, exclude=(MARKER,)) as local:
    api.upload_folder(
        repo_id=repo_id,
        repo_type='model',
        folder_path=local,
        commit_message=commit_message
        or f'Upload {os.path.basename(paths.resolve(folder).rstrip("/"))} ({LIBRARY_NAME})',
    )
  return str(url)
