"""The centre-pivot 4D convolution as one pass over the volume on CPU (`center_pivot_cpu.cc`), through
`jax.ffi`, with its own input and kernel gradients.

Why: XLA:CPU runs the centre-pivot convolution as two batched 2D convolutions, each between transposed
copies of the 6D volume, and derives a kernel gradient for the many small images that runs at a fraction
of the machine's matmul rate (docs/performance.md, issue 41). The kernels here read the volume in place
for both branches, write each output once, and keep the kernel gradient's accumulators in registers.

`center_pivot(x, kernel_a, kernel_b, bias, strides, padding, reference)` computes `conv4d.center_pivot`
(the definition, XLA's convolutions, passed in as `reference`) plus a bias with the C++ kernels on CPU
when they can be used (float32, one device or inside `shard_map`, a C++ compiler at hand), and is
`reference` plus the bias everywhere else.
The library is compiled on first use into ~/.cache/misc_jax (about 5 s), keyed by its source, jaxlib and
the CPU's flags; without a compiler the reference runs, with a warning.
"""

import contextlib
import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name('center_pivot_cpu.cc')
TARGETS = ('CenterPivotForward', 'CenterPivotInputGrad', 'CenterPivotKernelGrad')


def _compile(out: pathlib.Path):
  include = jax.ffi.include_dir()
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    lib = pathlib.Path(tmp) / out.name
    subprocess.run(['c++', '-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{include}',
                    str(SOURCE), '-o', str(lib), '-lpthread'], check=True, capture_output=True, text=True)
    os.replace(lib, out)  # atomic: a concurrent process sees the whole library or none


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith('flags')), '')
  except OSError:
    return ''


@functools.cache
def _library_loaded() -> bool:
  """Compiles (once per source, jaxlib and CPU) and registers the kernels; False if that fails."""
  import ctypes  # pylint: disable=g-import-not-at-top
  key = hashlib.sha256(SOURCE.read_bytes() + jax.lib.__version__.encode() + _cpu_flags().encode())
  cache = pathlib.Path(os.environ.get('MISC_JAX_CACHE', pathlib.Path.home() / '.cache' / 'misc_jax'))
  out = cache / f'center_pivot_cpu-{key.hexdigest()[:16]}.so'
  try:
    if not out.exists():
      cache.mkdir(parents=True, exist_ok=True)
      _compile(out)
    lib = ctypes.cdll.LoadLibrary(str(out))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = getattr(e, 'stderr', '') or e
    logging.warning('center_pivot_cpu: the C++ kernels are not available (%s); using XLA\'s convolutions',
                    str(detail)[-2000:])
    return False
  for name in TARGETS:
    jax.ffi.register_ffi_target(f'misc_jax_{name}', jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
  return True


def _call(name, out_shapes, *args, strides, padding):
  return jax.ffi.ffi_call(f'misc_jax_{name}', out_shapes, vmap_method='sequential')(
      *args, strides=np.asarray(strides, np.int64), padding=np.asarray(padding, np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ffi_conv(x, kernel_a, kernel_b, bias, strides, padding, out):
  return _call('CenterPivotForward', out, x, kernel_a, kernel_b, bias, strides=strides, padding=padding)


def _ffi_conv_fwd(x, kernel_a, kernel_b, bias, strides, padding, out):
  return _ffi_conv(x, kernel_a, kernel_b, bias, strides, padding, out), (x, kernel_a, kernel_b)


def _ffi_conv_bwd(strides, padding, out, residuals, dy):
  del out
  x, kernel_a, kernel_b = residuals
  dx = _call('CenterPivotInputGrad', jax.ShapeDtypeStruct(x.shape, x.dtype), dy, kernel_a.swapaxes(2, 3),
             kernel_b.swapaxes(2, 3), strides=strides, padding=padding)
  shapes = (jax.ShapeDtypeStruct(kernel_a.shape, kernel_a.dtype),
            jax.ShapeDtypeStruct(kernel_b.shape, kernel_b.dtype))
  da, db = _call('CenterPivotKernelGrad', shapes, x, dy, strides=strides, padding=padding)
  return dx, da, db, jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))


_ffi_conv.defvjp(_ffi_conv_fwd, _ffi_conv_bwd)


_disabled = False


@contextlib.contextmanager
def xla_only():
  """Traces inside this context use XLA's convolutions: for XLA's FLOP count, which does not see inside a
  custom call, and for timing the two side by side. JAX's caches are cleared on entry and exit: a function
  traced once either way would otherwise keep its first trace."""
  global _disabled
  before, _disabled = _disabled, True
  jax.clear_caches()
  try:
    yield
  finally:
    _disabled = before
    jax.clear_caches()


def usable(*operands) -> bool:
  """Whether the C++ kernels can compute this call: float32 throughout, no other device's data in the
  program (one device, or the per-device body of a shard_map), and a library that built."""
  if _disabled or any(v.dtype != jnp.float32 for v in operands):
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.size > 1 and not mesh.manual_axes:
    return False  # XLA would gather the whole volume onto every device around a custom call
  return _library_loaded()


def center_pivot(x, kernel_a, kernel_b, bias, strides, padding, reference):
  """reference(x, kernel_a, kernel_b, strides, padding) + bias, computed by the C++ kernels on CPU where
  `usable` (the choice is made when the program is lowered for its platform)."""
  strides, padding = tuple(strides), tuple(padding)
  plain = lambda x, a, b, bias: reference(x, a, b, strides, padding) + bias
  if not usable(x, kernel_a, kernel_b, bias):
    return plain(x, kernel_a, kernel_b, bias)
  out = jax.eval_shape(plain, x, kernel_a, kernel_b, bias)  # also checks that the branches agree
  return jax.lax.platform_dependent(x, kernel_a, kernel_b, bias,
                                    cpu=lambda *a: _ffi_conv(*a, strides, padding, out), default=plain)
