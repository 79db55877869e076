"""One resolver for every path a user types: relative to the current folder, URLs as typed."""

import os

import pytest

from mdt_jax import paths


def test_relative_and_home_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert paths.resolve('runs/quickstart') == str(tmp_path / 'runs' / 'quickstart')
  assert paths.resolve('./a/../b') == str(tmp_path / 'b')
  assert paths.resolve('~/cache/x') == str(tmp_path / 'home' / 'cache' / 'x')
  assert paths.resolve(tmp_path / 'p') == str(tmp_path / 'p')  # PathLike too
  assert paths.resolve_optional(None) is None and paths.resolve_optional('') is None
  assert paths.resolve_optional('y') == os.path.join(str(tmp_path), 'y')


def test_urls_are_kept_as_typed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for url in ('gs://bucket/run1', 's3://b/k', 'hf://user/repo', 'file:///tmp/x'):
    assert paths.is_remote(url)
    assert paths.resolve(url) == url
  # a Hub id or a drive-less relative path is no URL
  assert not paths.is_remote('user/repo') and not paths.is_remote('c:relative')


def test_an_empty_path_is_refused():
  with pytest.raises(ValueError, match='empty path'):
    paths.resolve('')


def test_the_cache_folder_is_read_when_used_and_may_be_relative(tmp_path, monkeypatch):
  from mdt_jax import evaluate
  from mdt_jax.evaluation import digits_classifier

  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('MDT_JAX_CACHE', 'cache')
  assert paths.cache_dir() == str(tmp_path / 'cache')
  assert digits_classifier.default_cache_dir() == str(tmp_path / 'cache')
  weights = str(tmp_path / 'cache' / 'inception_fid.safetensors')
  assert evaluate.parse_args(['--samples', 's.npz', '--reference', 'r.npz']).inception == weights
  monkeypatch.delenv('MDT_JAX_CACHE')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert paths.cache_dir() == str(tmp_path / 'home' / '.cache' / 'mdt_jax')
