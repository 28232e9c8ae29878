r"""Speed and memory of the 4D operators on this machine.

  python benchmarks/ops.py [--sizes 16,32,64] [--out benchmarks/results/ops.json]

For the 4D correlation, the center-pivot conv (forward, and forward+backward) and the whole center-pivot
decoders of KBCNet-tiny and KBCNet-R101 (forward+backward) at feature maps of size x size per image:
median milliseconds, GFLOP/s (FLOPs from XLA's cost analysis of its own formulation), and the ratio to a float32 matmul measured
in the same run. Then the compiled temporary memory of a forward+backward through
KBCNet-R101's three-block center-pivot decoder, naive vs the memory-bounded path (`chunked_stack`).
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from misc_jax.models import kbcnet
from misc_jax.ops import center_pivot_cpu
from misc_jax.ops import conv4d
from misc_jax.ops import correlation


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of fn with the centre-pivot convolution as XLA's own convolutions: the cost analysis
  does not see inside the C++ kernels' custom calls (ops/center_pivot_cpu.py)."""
  with center_pivot_cpu.xla_only():
    return (jax.jit(fn).lower(*args).compile().cost_analysis() or {}).get('flops', float('nan'))


def bench(fn, *args, reps):
  """(median seconds, FLOPs) of a jitted fn."""
  compiled = jax.jit(fn).lower(*args).compile()
  flops = xla_flops(fn, *args)
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), flops


def matmul_gflops(n=2048):
  a = jax.random.normal(jax.random.key(0), (n, n))
  seconds, _ = bench(lambda a: a @ a, a, reps=10)
  return 2 * n**3 / seconds / 1e9


def op_cases(size, channels, cp_channels):
  """(name, fn, args) of the benchmarked ops at one feature size."""
  key = jax.random.key(0)
  src = jax.random.normal(key, (1, size, size, channels))
  trg = jax.random.normal(jax.random.fold_in(key, 1), (1, size, size, channels))
  corr = lambda s, t: correlation.correlation(s, t)
  corr_grad = jax.grad(lambda s, t: jnp.sum(correlation.correlation(s, t) ** 2))
  vol = jax.random.normal(key, (1, size, size, size, size, cp_channels))
  cp = conv4d.CenterPivotConv4d(16, (3, 3, 3, 3), (1, 1, 2, 2))
  params = cp.init(key, vol[:, :4, :4, :4, :4])['params']
  cp_fwd = lambda p, x: cp.apply({'params': p}, x)
  cp_grad = jax.grad(lambda p, x: jnp.sum(cp.apply({'params': p}, x) ** 2), argnums=(0, 1))
  cases = [(f'correlation C={channels}', 'fwd', corr, (src, trg)),
           (f'correlation C={channels}', 'fwd+bwd', corr_grad, (src, trg)),
           (f'center-pivot {cp_channels}->16 s2', 'fwd', cp_fwd, (params, vol)),
           (f'center-pivot {cp_channels}->16 s2', 'fwd+bwd', cp_grad, (params, vol))]
  for variant in ('kbcnet_tiny', 'kbcnet_r101'):  # the whole decoder, as the models run it
    v = kbcnet.VARIANTS[variant]
    features = v['decoder_features']
    stack = conv4d.CenterPivotStack(features, v['decoder_kernels'], v['decoder_strides'])
    stack_params = stack.init(key, vol[:, :4, :4, :4, :4])['params']
    stack_grad = jax.grad(lambda p, x, s=stack: jnp.sum(s.apply({'params': p}, x) ** 2), argnums=(0, 1))
    name = f'decoder {cp_channels}->{"->".join(map(str, features))} ({variant})'
    cases.append((name, 'fwd+bwd', stack_grad, (stack_params, vol)))
  return cases


def stack_memory(size, chunk_rows):
  """Compiled temporary memory (MiB) of the parameter gradient through KBCNet-R101's decoder stack."""
  x = jax.ShapeDtypeStruct((1, size, size, size, size, 3), jnp.float32)
  stack = conv4d.CenterPivotStack((16, 64, 128), (3, 3, 3), (2, 2, 1))
  params = jax.eval_shape(lambda: stack.init(jax.random.key(0), jnp.zeros(x.shape)))['params']

  def apply(p, x):
    if not chunk_rows:
      return stack.apply({'params': p}, x)
    padded = jnp.pad(x, [(0, 0), (3, 3)] + [(0, 0)] * 4)
    volume_rows = lambda start, n: jax.lax.dynamic_slice_in_dim(padded, start + 3, n, axis=1)
    return conv4d.chunked_stack(stack, p, volume_rows, size, chunk_rows)
  loss = lambda p, x: jnp.mean(apply(p, x) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='16,32,64')
  parser.add_argument('--channels', type=int, default=256)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--out', default=None, help='JSON file for the results')
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(',')]
  device = jax.devices()[0]
  machine = f'{device.device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, {platform.processor()}'
  peak = matmul_gflops()
  print(f'# {machine}; jax {jax.__version__}; float32 matmul 2048^3: {peak:.1f} GFLOP/s\n')
  print('| op | pass | size | median ms | GFLOP | GFLOP/s | / matmul |')
  print('|---|---|---|---|---|---|---|')
  rows = []
  for size in sizes:
    for name, kind, fn, fn_args in op_cases(size, args.channels, 3):
      reps = args.reps if size < 64 else max(2, args.reps // 2)
      seconds, flops = bench(fn, *fn_args, reps=reps)
      rate = flops / seconds / 1e9
      rows.append(dict(op=name, kind=kind, size=size, ms=1e3 * seconds, gflop=flops / 1e9,
                       gflops=rate, ratio=rate / peak))
      print(f'| {name} | {kind} | {size} | {1e3 * seconds:.2f} | {flops / 1e9:.2f} | {rate:.1f} '
            f'| {rate / peak:.2f} |', flush=True)
  print('\n| stack 3->16->64->128, target strides 2,2,1 | size | naive MiB | chunked (1 row) MiB |')
  print('|---|---|---|---|')
  memory = []
  for size in sizes:
    naive, bounded = stack_memory(size, 0), stack_memory(size, 1)
    memory.append(dict(size=size, naive_mib=naive, chunked_mib=bounded))
    print(f'| parameter gradient | {size} | {naive:.1f} | {bounded:.1f} |', flush=True)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(dict(machine=machine, jax=jax.__version__, matmul_gflops=peak, ops=rows,
                     memory=memory, date=time.strftime('%Y-%m-%d')), f, indent=2)


if __name__ == '__main__':
  main()
