r"""Examples/s of the tfds input pipeline alone, next to what the train step consumes.

  python benchmarks/input_pipeline.py [--dataset synthetic_misc/default] [--sizes 128,240] \
      [--batch 16] [--batches 40] [--data_dir DIR] [--train_step benchmarks/results/train_step_cpu.json]

Reads the training stream of `input_pipeline.train_iterator` (decode, resize, augment, pad, batch; host
arrays, no device copy) after a warm-up of 5 batches. With --train_step (the JSON of
benchmarks/train_step.py), prints the ratio of the pipeline's rate to the step's pairs/s at the same
resolution: the pipeline should deliver at least 3x what the step consumes.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from configs import synthetic  # pylint: disable=g-import-not-at-top
from misc_jax import input_pipeline
from tfds_builders import build


def examples_per_second(config, batches: int, warmup: int = 5) -> float:
  it = input_pipeline.train_iterator(config, to_device=False)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='synthetic_misc/default')
  parser.add_argument('--sizes', default='128,240')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--train_step', default=None, help='JSON written by benchmarks/train_step.py')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  build.build(args.dataset, args.data_dir)
  steps = json.load(open(args.train_step))['rows'] if args.train_step else []
  print(f'# {args.dataset}, {os.cpu_count()} CPUs, batch {args.batch}\n')
  print('| px | pipeline examples/s | train step pairs/s (variant, dtype) | ratio |')
  print('|---|---|---|---|')
  rows = []
  for size in map(int, args.sizes.split(',')):
    config = synthetic.get_config()
    with config.unlocked():
      config.dataset.name, config.dataset.data_dir = args.dataset, args.data_dir
      config.batch_size = args.batch
      config.input.image_size = size
    rate = examples_per_second(config, args.batches)
    consumers = [r for r in steps if r['image_size'] == size] or [None]
    for step in consumers:
      ratio = rate / step['pairs_per_s'] if step else float('nan')
      label = f'{step["pairs_per_s"]:.2f} ({step["variant"]}, {step["dtype"]})' if step else '-'
      print(f'| {size} | {rate:.1f} | {label} | {ratio:.1f} |', flush=True)
      rows.append(dict(image_size=size, examples_per_s=rate, step=step, ratio=ratio))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(dataset=args.dataset, cpus=os.cpu_count(), date=time.strftime('%Y-%m-%d'),
                     batch=args.batch, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
