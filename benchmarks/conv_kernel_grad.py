r"""Where the centre-pivot convolution's backward pass goes on this CPU: one branch's 3 x 3 convolution.

  python benchmarks/conv_kernel_grad.py [--images 512] [--side 16] [--channels 16]

Times (median ms, 2 threads) XLA's forward convolution, its input gradient and its kernel gradient, a plain
matrix product of the kernel gradient's size (its FLOPs at the machine's matmul rate), and the kernel
gradient written other ways: one product per tap over shifted slices, im2col then one product, and the
taps taken on the 6D volume [B, Ha, Wa, Hb * Wb, C] without transposing it (docs/performance.md, issue 41).
"""

import argparse
import os

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2')
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

import ops  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/ops.py, beside this file)


def median_ms(fn, *args) -> float:
  return 1e3 * ops.bench(fn, *args, reps=7)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=512, help='B x Hb x Wb: the branch\'s batch')
  parser.add_argument('--side', type=int, default=16)
  parser.add_argument('--channels', type=int, default=16)
  a = parser.parse_args()
  n, s, c = a.images, a.side, a.channels
  key = jax.random.key(0)
  x, dy = jax.random.normal(key, (n, s, s, c)), jax.random.normal(jax.random.key(1), (n, s, s, c))
  kernel = jax.random.normal(key, (3, 3, c, c))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1), (1, 1)],
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifted = lambda xp, i, j: xp[:, i:i + s, j:j + s]
  per_tap = lambda x, dy: jnp.stack([jnp.einsum('nhwc,nhwo->co', shifted(pad(x), i, j), dy)
                                     for i in range(3) for j in range(3)])
  im2col = lambda x, dy: jnp.concatenate([shifted(pad(x), i, j) for i in range(3) for j in range(3)],
                                         -1).reshape(-1, 9 * c).T @ dy.reshape(-1, c)
  b = max(n // s // s, 1)  # the same data as a 6D volume: [B, Ha, Wa, Hb * Wb, C]
  x6, dy6 = (v.reshape(b, -1, s, s, c).transpose(0, 2, 3, 1, 4) for v in (x, dy))
  pad6 = lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  volume_taps = lambda x, dy: jnp.stack([pad6(x)[:, i:i + s, j:j + s].reshape(-1, c).T @ dy.reshape(-1, c)
                                         for i in range(3) for j in range(3)])
  rows = [
      ('XLA forward convolution', median_ms(conv, x, kernel)),
      ('XLA input gradient', median_ms(lambda x, k, dy: jax.vjp(lambda x: conv(x, k), x)[1](dy), x, kernel,
                                       dy)),
      ('XLA kernel gradient', median_ms(lambda x, k, dy: jax.vjp(lambda k: conv(x, k), k)[1](dy), x, kernel,
                                        dy)),
      ('a matrix product of the same FLOPs', median_ms(lambda x, dy: x.reshape(-1, c).T @ dy.reshape(-1, c),
                                                       pad(x)[:, :s, :s], dy)),
      ('kernel gradient: a product per tap', median_ms(per_tap, x, dy)),
      ('kernel gradient: im2col, one product', median_ms(im2col, x, dy)),
      ('kernel gradient: taps on the 6D volume', median_ms(volume_taps, x6, dy6)),
  ]
  print(f'# {jax.devices()[0].device_kind}; jax {jax.__version__}; {n} images of {s} x {s} x {c}\n')
  print('| what | ms |\n|---|---|')
  for name, ms in rows:
    print(f'| {name} | {ms:.1f} |')


if __name__ == '__main__':
  main()
