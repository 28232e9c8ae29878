"""The C++ centre-pivot convolution (ops/center_pivot_cpu.cc) against its definition, conv4d.center_pivot
(XLA's two convolutions) plus a bias: outputs and all four gradients, over strides, odd sizes, kernel sizes
and channel counts that take each of its code paths (wide and narrow vectors, channel tails)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from misc_jax.ops import center_pivot_cpu
from misc_jax.ops import conv4d


def _lowered(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize('shape,out,kernel,strides', [
    ((2, 5, 6, 7, 4, 3), 5, (3, 3, 3, 3), (1, 1, 1, 1)),   # odd sizes; 3 -> 5 channels
    ((2, 5, 6, 7, 4, 3), 16, (3, 3, 3, 3), (1, 1, 2, 2)),  # target strides; narrow input gradient
    ((1, 6, 5, 4, 7, 17), 20, (3, 3, 3, 3), (2, 2, 1, 1)),  # source strides; channel tails
    ((1, 7, 6, 5, 8, 4), 16, (5, 5, 3, 3), (1, 1, 2, 2)),  # a 5 x 5 source kernel
    ((1, 7, 7, 7, 7, 2), 3, (3, 3, 3, 3), (1, 1, 3, 3)),   # stride 3: the general division
    ((2, 6, 6, 6, 6, 16), 64, (3, 3, 3, 3), (1, 1, 1, 1)),  # several vectors of outputs
    ((1, 5, 4, 6, 5, 8), 2, (3, 3, 3, 3), (1, 1, 1, 1)),   # 2 outputs: narrow where 8 channels fill a vector
])
def test_equals_the_xla_formulation_with_its_gradients(shape, out, kernel, strides):
  padding = tuple(k // 2 for k in kernel)
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], shape)
  ka = jax.random.normal(keys[1], (*kernel[:2], shape[-1], out))
  kb = jax.random.normal(keys[2], (*kernel[2:], shape[-1], out))
  bias = jax.random.normal(keys[3], (out,))
  plain = lambda x, a, b, bias: conv4d.center_pivot(x, a, b, strides, padding) + bias
  fast = lambda *args: center_pivot_cpu.center_pivot(*args, strides, padding, conv4d.center_pivot)
  assert 'misc_jax_CenterPivotForward' in _lowered(fast, x, ka, kb, bias)  # not a silent fallback
  y_plain = plain(x, ka, kb, bias)
  weights = jax.random.normal(keys[4], y_plain.shape)  # a loss whose gradient differs per output cell
  loss = lambda f: lambda *a: jnp.sum(f(*a) * weights)
  np.testing.assert_allclose(jax.jit(fast)(x, ka, kb, bias), y_plain, rtol=1e-5, atol=1e-4)
  grads = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2, 3)))(x, ka, kb, bias)
  expected = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x, ka, kb, bias)
  for name, g, e in zip(('input', 'source kernel', 'target kernel', 'bias'), grads, expected):
    scale = float(jnp.max(jnp.abs(e)))
    np.testing.assert_allclose(g, e, rtol=0, atol=2e-6 * scale, err_msg=name)


def test_the_module_uses_it_on_cpu_and_xla_elsewhere(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4, 4, 3))
  module = conv4d.CenterPivotConv4d(8, (3, 3, 3, 3), (1, 1, 2, 2))
  params = module.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == {'params': {
      'conv_a': {'kernel': (3, 3, 3, 8), 'bias': (8,)}, 'conv_b': {'kernel': (3, 3, 3, 8), 'bias': (8,)}}}
  y = module.apply(params, x)
  assert 'misc_jax_CenterPivotForward' in _lowered(module.apply, params, x)
  # bfloat16, a loop body's gradients, or no compiled library: XLA's convolutions, the same numbers.
  assert 'misc_jax' not in _lowered(conv4d.CenterPivotConv4d(8, (3, 3, 3, 3), (1, 1, 2, 2),
                                                            dtype=jnp.bfloat16).apply, params, x)
  assert 'misc_jax' not in _lowered(conv4d.CenterPivotConv4d(8, (3, 3, 3, 3), (1, 1, 2, 2),
                                                            loop_grads=True).apply, params, x)
  monkeypatch.setattr(center_pivot_cpu, '_library_loaded', lambda: False)
  assert 'misc_jax' not in _lowered(module.apply, params, x)
  np.testing.assert_allclose(module.apply(params, x), y, rtol=1e-5, atol=1e-5)


def test_a_mesh_of_several_devices_keeps_xla_s_convolutions():
  """Around a custom call XLA would gather the whole volume onto every device: on a data-parallel mesh
  the module keeps the convolutions XLA can partition."""
  x = jnp.ones((len(jax.devices()), 4, 4, 4, 4, 3))
  module = conv4d.CenterPivotConv4d(4)
  params = module.init(jax.random.key(0), x)
  mesh = jax.make_mesh((len(jax.devices()),), ('batch',))
  with jax.set_mesh(mesh):
    text = _lowered(module.apply, params, x)
  assert ('misc_jax' in text) == (len(jax.devices()) == 1)


def test_xla_only_retraces_what_was_traced_with_the_kernels():
  """The benchmarks count FLOPs inside `xla_only` (a custom call has none for XLA) after timing the same
  function with the C++ kernels; a cached trace would report the custom call's zero."""
  x = jnp.ones((1, 6, 6, 6, 6, 8))
  module = conv4d.CenterPivotConv4d(8)
  params = module.init(jax.random.key(0), x)
  apply = lambda params, x: module.apply(params, x)  # one function object, as the benchmarks pass
  flops = lambda: jax.jit(apply).lower(params, x).compile().cost_analysis()['flops']
  with_kernels = flops()
  with center_pivot_cpu.xla_only():
    assert 'misc_jax' not in _lowered(apply, params, x)
    with_xla = flops()
  assert 'misc_jax' in _lowered(apply, params, x)
  assert with_xla > 6**4 * 8 * 8 * 18 > with_kernels  # half of 2 FLOP per multiply-add: no padding counted
