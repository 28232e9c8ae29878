r"""Data-parallel scaling of the train step: 1, 2, 4, 8 devices, step time, per-device batch, and whether
the losses agree.

  python benchmarks/scaling.py [--devices 1,2,4,8] [--global_batch 8] [--variant kbcnet_tiny] \
      [--size 128] [--steps 3] [--platform cpu] [--out benchmarks/results/scaling_cpu.json]

Each device count runs in a fresh process: on CPU with that many fake devices
(`--xla_force_host_platform_device_count`), which share this machine's cores, so the step time shows the
cost of the scaling code (the partitioned step, the gradient all-reduce), not a speed-up; with `--platform gpu` on the
first N GPUs (CUDA_VISIBLE_DEVICES). Fixed global batch (strong scaling): the same random pairs are split
over the devices, so every count must give the same loss at every step, up to float32 summation order.
The tiny variant normalises with GroupNorm, so no statistic depends on the split.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULT = 'RESULT '


def worker(args):
  """Runs in the child process: the timed steps on all visible devices, one JSON line on stdout."""
  import jax  # pylint: disable=g-import-not-at-top  (after the parent set XLA_FLAGS / CUDA_VISIBLE_DEVICES)
  import train_step  # pylint: disable=g-import-not-at-top

  n = jax.local_device_count()
  if args.global_batch % n:
    raise SystemExit(f'--global_batch {args.global_batch} does not split over {n} devices')
  config = train_step.benchmark_config(args.variant, args.size, 'float32', args.global_batch)
  batch = train_step.random_batch(config, args.global_batch)  # the same pairs for every device count
  run = train_step.run_steps(config, batch, args.steps)
  print(RESULT + json.dumps(dict(devices=n, device_kind=jax.devices()[0].device_kind,
                                 per_device_batch=args.global_batch // n, **run)), flush=True)


def run_child(args, n: int) -> dict:
  env = dict(os.environ)
  if args.platform == 'cpu':
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={n}'.strip()
    env['JAX_PLATFORMS'] = 'cpu'
  else:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, range(n)))
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--global_batch', str(args.global_batch),
         '--variant', args.variant, '--size', str(args.size), '--steps', str(args.steps)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f'{n} devices: the worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len(RESULT):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--global_batch', type=int, default=8)
  parser.add_argument('--variant', default='kbcnet_tiny')
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  print(f'# {args.variant}, {args.size} px, global batch {args.global_batch}, float32, {args.platform}; '
        f'{os.cpu_count()} CPUs\n')
  print('| devices | per-device batch | step s | pairs/s | compile s | max loss diff vs 1st row |')
  print('|---|---|---|---|---|---|')
  rows = []
  for n in map(int, args.devices.split(',')):
    row = run_child(args, n)
    row['step_s'] = statistics.median(row['times'])
    row['pairs_per_s'] = args.global_batch / row['step_s']
    row['max_loss_diff'] = max(abs(a - b) for a, b in zip(row['losses'], (rows or [row])[0]['losses']))
    rows.append(row)
    print(f'| {n} | {row["per_device_batch"]} | {row["step_s"]:.3f} | {row["pairs_per_s"]:.2f} | '
          f'{row["compile_s"]:.1f} | {row["max_loss_diff"]:.2e} |', flush=True)
  print('\nlosses per step (warm-up step first):')
  for row in rows:
    print(f'  {row["devices"]} devices: ' + ', '.join(f'{l:.6f}' for l in row['losses']))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(date=time.strftime('%Y-%m-%d'), variant=args.variant, image_size=args.size,
                     global_batch=args.global_batch, platform=args.platform, cpus=os.cpu_count(),
                     rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
