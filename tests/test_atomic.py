"""Folders are written whole or not at all."""

import os

import pytest

from mdt_jax.atomic import atomic_folder


def test_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'old.txt').write_text('old')
  with pytest.raises(RuntimeError, match='boom'):
    with atomic_folder(str(out), overwrite=True) as tmp:
      (tmp_path / 'seen').write_text(tmp)
      with open(os.path.join(tmp, 'new.txt'), 'w') as f:
        f.write('half')
      raise RuntimeError('boom')
  assert os.listdir(out) == ['old.txt']
  assert sorted(os.listdir(tmp_path)) == ['out', 'seen']


def test_success_replaces_and_refuses_without_overwrite(tmp_path):
  out = tmp_path / 'out'
  with atomic_folder(str(out)) as tmp:
    with open(os.path.join(tmp, 'a.txt'), 'w') as f:
      f.write('1')
  with pytest.raises(FileExistsError, match='exists and is not empty'):
    with atomic_folder(str(out)):
      pass
  with atomic_folder(str(out), overwrite=True) as tmp:
    with open(os.path.join(tmp, 'b.txt'), 'w') as f:
      f.write('2')
  assert os.listdir(out) == ['b.txt']
  assert sorted(os.listdir(tmp_path)) == ['out']
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
