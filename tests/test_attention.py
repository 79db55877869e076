"""The fused TPU attention kernel (Pallas, interpret mode on the CPU) equals XLA's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax.models import attention


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _inputs(dtype, b, n, heads, dh, shared, masked):
  keys = jax.random.split(jax.random.key(0), 4)
  qkv = jax.random.normal(keys[0], (b, n, 3 * heads * dh)).astype(dtype)
  bias = jax.random.normal(keys[1], (heads, n, n) if shared else (b, heads, n, n)).astype(dtype)
  # every sample keeps a different number of keys (a masked encoder's buffer)
  mask = jnp.arange(n)[None] < (n - 1 - jnp.arange(b))[:, None] if masked else None
  cotangent = jax.random.normal(keys[2], (b, n, heads * dh))
  return qkv, bias, mask, cotangent


def _value_and_grads(fn, qkv, bias, cotangent):
  loss = lambda qkv, bias: (fn(qkv, bias).astype(jnp.float32) * cotangent).sum()  # noqa: E731
  out = jax.jit(lambda qkv, bias: fn(qkv, bias))(qkv, bias)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1)))(qkv, bias)


@pytest.mark.parametrize(
    'dtype, shared, masked',
    [
        (jnp.float32, True, False),  # the full-length passes: one bias for the batch
        (jnp.float32, False, True),  # the masked encoder: per-sample bias, padded key slots
        (jnp.bfloat16, True, True),
    ],
)
def test_fused_attention_equals_xla(dtype, shared, masked):
  b, n, heads, dh = 4, 12, 2, 8  # n: not a multiple of 8, as the masked buffer (179)
  qkv, bias, mask, ct = _inputs(dtype, b, n, heads, dh, shared, masked)
  xla = lambda q, bi: attention.attend(q, bi, mask, heads, 'xla')  # noqa: E731
  fused = lambda q, bi: attention.fused_attention(q, bi, mask, heads, interpret=True)  # noqa
  out_x, (dqkv_x, dbias_x) = _value_and_grads(xla, qkv, bias, ct)
  out_f, (dqkv_f, dbias_f) = _value_and_grads(fused, qkv, bias, ct)
  assert out_f.shape == (b, n, heads * dh) and dbias_f.shape == bias.shape
  if dtype == jnp.float32:  # the same arithmetic: equal to float32 rounding
    tol = dict(out=1e-6, dqkv=1e-6, dbias=1e-6)
  else:  # bf16: the kernel rounds the logits' gradient before the
    tol = dict(out=1e-6, dqkv=4e-3, dbias=1e-4)  # q/k matmuls (as bf16 matmuls on a TPU
    # do; XLA:CPU keeps it float32): 1.8e-3 apart here
  assert _rel(out_f, out_x) <= tol['out']
  assert _rel(dqkv_f, dqkv_x) <= tol['dqkv']
  assert _rel(dbias_f, dbias_x) <= tol['dbias']
  if masked:  # padded key slots get no attention: no gradient to them
    dk = np.asarray(dqkv_f, np.float32)[:, :, heads * dh : 2 * heads * dh]
    assert np.all(dk[~np.asarray(mask)] == 0)


@pytest.mark.every_backend
def test_attend_picks_xla_off_tpu():
  # On the CPU the automatic choice lowers jax's own attention, not the kernel
  qkv, bias, _, _ = _inputs(jnp.float32, 2, 8, 2, 4, True, False)
  text = jax.jit(lambda q, b: attention.attend(q, b, None, 2)).lower(qkv, bias).as_text()
  assert 'tpu_custom_call' not in text
  np.testing.assert_allclose(
      attention.attend(qkv, bias, None, 2),
      attention.attend(qkv, bias, None, 2, 'xla'),
      rtol=1e-6,
      atol=1e-6,
  )


@pytest.mark.parametrize('shared, masked', [(True, False), (False, True)])
def test_kernel_per_batch_shard_equals_xla(shared, masked):
  # As the train step runs it: within `batch_sharded` the kernel runs per batch shard under
  # shard_map (8 devices); the shared bias's gradient is summed over the shards
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  heads = 2
  qkv, bias, mask, ct = _inputs(jnp.float32, 8, 8, heads, 4, shared, masked)

  def run(impl):
    def fn(q, b):
      with attention.batch_sharded(mesh, ('data', 'fsdp')), attention.interpret_kernels():
        return attention.attend(q, b, mask, heads, impl)

    return _value_and_grads(fn, qkv, bias, ct)

  (out_f, grads_f), (out_x, grads_x) = run('pallas'), run('xla')
  assert _rel(out_f, out_x) < 1e-6
  assert _rel(grads_f[0], grads_x[0]) < 1e-6 and _rel(grads_f[1], grads_x[1]) < 1e-6
