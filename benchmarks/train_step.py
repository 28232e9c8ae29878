r"""Training throughput of KBCNet: pairs/s, step time, XLA FLOPs, and the fraction of a peak reached.

  python benchmarks/train_step.py [--variants kbcnet_tiny,kbcnet_r101] [--sizes 240,512] \
      [--dtypes float32,bfloat16] [--batch 1] [--steps 3] [--out benchmarks/results/train_step_cpu.json]

Times the real pmapped `train.train_step` (forward, loss, backward, AdamW) on random inputs of fixed shape
(the input pipeline is benchmarks/input_pipeline.py's), one pair per device by default, feature stride 16
for ResNet variants (a 15 x 15 grid at 240 px, 32 x 32 at 512) and 8 for the tiny one. FLOPs per step come
from XLA's cost analysis of the compiled step; the fraction is of a float32 matmul measured in the same run
(CPU), or of `--peak_tflops` when given (an accelerator's datasheet peak). A compile counter fails the run
if any timed step compiles again.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
from jax import monitoring
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from configs import synthetic  # pylint: disable=g-import-not-at-top
from misc_jax import train
from misc_jax.models import kbcnet

_COMPILES = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == '/jax/core/compile/backend_compile_duration' else None)


def matmul_gflops(n=2048, reps=10):
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e9


def random_batch(config, devices: int, per_device: int):
  """A batch of the pipeline's layout [devices, per_device, ...] with random images and keypoints."""
  rng = np.random.default_rng(0)
  s, i, k = config.input.image_size, config.input.max_instances, config.input.max_keypoints
  shape = (devices, per_device)

  def side():
    kps = rng.uniform(0.1 * s, 0.9 * s, shape + (i, k, 2)).astype(np.float32)
    return {'image': rng.integers(0, 256, shape + (s, s, 3), dtype=np.uint8), 'keypoints': kps,
            'keypoint_valid': np.ones(shape + (i, k), bool),
            'bboxes': np.tile(np.array([0, 0, s, s], np.float32), shape + (i, 1)),
            'instance_valid': np.ones(shape + (i,), bool), 'masks': np.zeros(shape + (i, s, s), bool),
            'has_masks': np.zeros(shape, bool), 'scale': np.ones(shape + (2,), np.float32)}

  return {'source': side(), 'target': side(), 'category': np.zeros(shape, np.int32),
          'valid': np.ones(shape, bool)}


def measure(variant: str, size: int, dtype: str, per_device: int, steps: int) -> dict:
  config = synthetic.get_config()
  with config.unlocked():
    config.model.update(variant=variant, **kbcnet.decode_variant(variant))
    config.model.dtype = dtype
    config.model.feature_stride = 8 if variant == 'kbcnet_tiny' else 16
    config.input.image_size = size
    config.input.max_instances = 1
    config.input.max_keypoints = 16
  devices = jax.local_device_count()
  config.batch_size = devices * per_device
  model_module, model = train.create_model(config)
  p_state = train.replicate(train.initial_state(config, model))
  batch = jax.pmap(lambda x: x)(random_batch(config, devices, per_device))  # on the devices, once
  rng = train.replicate(jax.random.key_data(jax.random.key(0)))
  step = jax.pmap(lambda s, b, r: train.train_step(s, b, jax.random.wrap_key_data(r),
                                                   model_module=model_module, config=config),
                  axis_name='batch', donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(p_state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  flops = (compiled.cost_analysis() or {}).get('flops', float('nan'))
  p_state, metrics = step(p_state, batch, rng)  # warm-up (the first call also compiles)
  jax.block_until_ready(metrics)
  compiles_before = len(_COMPILES)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    p_state, metrics = step(p_state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  if len(_COMPILES) != compiles_before:
    raise RuntimeError(f'{variant} {size} px {dtype}: {len(_COMPILES) - compiles_before} recompilations '
                       'during timed steps')
  seconds = statistics.median(times)
  grid = size // config.model.feature_stride
  return dict(variant=variant, image_size=size, grid=grid, dtype=dtype, batch=config.batch_size,
              step_s=seconds, pairs_per_s=config.batch_size / seconds, gflop_per_step=flops / 1e9,
              gflops=flops / 1e9 / seconds, compile_s=compile_s, recompiles=0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='kbcnet_tiny,kbcnet_r101')
  parser.add_argument('--sizes', default='240,512')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=1, help='pairs per device')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help="the device's peak (default: a float32 matmul measured here)")
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  device = jax.devices()[0]
  peak = args.peak_tflops * 1e3 if args.peak_tflops else matmul_gflops()
  machine = f'{device.device_kind} x{jax.local_device_count()}, {os.cpu_count()} CPUs, {platform.processor()}'
  print(f'# {machine}; jax {jax.__version__}; peak used: {peak:.1f} GFLOP/s '
        f'({"given" if args.peak_tflops else "float32 matmul 2048^3, measured"})\n')
  print('| variant | px | grid | dtype | batch | step s | pairs/s | GFLOP/step | GFLOP/s | / peak | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  rows = []
  for variant in args.variants.split(','):
    for size in map(int, args.sizes.split(',')):
      for dtype in args.dtypes.split(','):
        row = measure(variant, size, dtype, args.batch, args.steps)
        row['fraction_of_peak'] = row['gflops'] / peak
        rows.append(row)
        print(f'| {variant} | {size} | {row["grid"]} | {dtype} | {row["batch"]} | {row["step_s"]:.3f} | '
              f'{row["pairs_per_s"]:.2f} | {row["gflop_per_step"]:.1f} | {row["gflops"]:.1f} | '
              f'{row["fraction_of_peak"]:.3f} | {row["compile_s"]:.1f} |', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(machine=machine, date=time.strftime('%Y-%m-%d'), jax=jax.__version__,
                     peak_gflops=peak, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
