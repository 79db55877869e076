"""--parity: the loss and gradients of two compute settings of one model, same weights and draws."""

import numpy as np
import pytest

from micro_config import get_config
from benchmarks import parity


@pytest.fixture(scope='module')
def comparison():
  return parity.Comparison(get_config(), batch_size=8)


def test_bfloat16_differs_a_little_from_float32(comparison):
  r = comparison.against({'dtype': 'bfloat16'})
  assert (r['setting'], r['reference']) == ('dtype=float32', 'dtype=bfloat16')
  # the zero-initialised layers are filled, so the outputs (not only the gradients) depend on
  # the compute dtype: both branches' losses move, by bfloat16's rounding and no more
  for key in ('plain_loss_rel_diff', 'masked_loss_rel_diff'):
    assert 1e-6 < r[key] < 1e-2, (key, r[key])
  assert 1e-4 < r['grad_rel_diff'] < 0.05
  assert r['grad_rel_diff'] <= r['worst_param_rel_diff']
  assert r['worst_param'].count('.') >= 1


def test_padded_mask_buffer_gives_the_same_training_signal(comparison):
  # 16 tokens keep 11: the buffer padded to 16 adds masked key slots and must change nothing
  r = comparison.against({'mask_buffer_multiple': 8})
  assert r['masked_loss_rel_diff'] < 1e-6 and r['plain_loss_rel_diff'] == 0.0
  assert r['grad_rel_diff'] < 1e-5


def test_zero_weights_are_filled_and_others_kept(comparison):
  from flax import nnx
  from mdt_jax.models.mdt import MDT, MDTConfig
  import jax

  init = nnx.to_pure_dict(
      nnx.state(MDT(MDTConfig.from_dict(comparison.fields), rngs=nnx.Rngs(comparison.config.seed)))
  )
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(comparison.params)):
    a, b = np.asarray(a), np.asarray(b)
    if a.any():
      np.testing.assert_array_equal(a, b)
    else:
      assert 0.01 < b.std() < 0.03


@pytest.mark.parametrize(
    'spec, match',
    [
        ('attention_impl', 'not of the form field=value'),
        ('=xla', 'not of the form field=value'),
        (',', 'names no field=value'),
    ],
)
def test_bad_specs_are_refused(spec, match):
  with pytest.raises(ValueError, match=match):
    parity.parse_overrides(spec)


def test_spec_values_and_unknown_fields(comparison):
  assert parity.parse_overrides(
      'remat=true, mask_buffer_multiple=8,attention_impl=xla,dtype=bfloat16,attention_impl=none'
  ) == {'remat': True, 'mask_buffer_multiple': 8, 'attention_impl': None, 'dtype': 'bfloat16'}
  with pytest.raises(ValueError, match=r"unknown model fields \['atention_impl'\]"):
    comparison.against({'atention_impl': 'xla'})


@pytest.mark.parametrize(
    'spec',
    ['hidden_size=64', 'mask_ratio=0.5', 'dtype=bfloat16,mask_ratio=0.5', 'class_dropout_prob=0.0'],
)
def test_only_compute_options_are_compared(comparison, spec):
  # mask_ratio keeps every shape yet changes what is computed: refused like a new width, when
  # the spec is read (before any compile) and by the comparison itself
  name = spec.split(',')[-1].split('=')[0]
  match = rf"\['{name}'\] are not compute options; .*compares the compute settings \(dtype, "
  with pytest.raises(ValueError, match=match):
    parity.parse_overrides(spec)
  with pytest.raises(ValueError, match=match):
    comparison.against({name: 0.5})
