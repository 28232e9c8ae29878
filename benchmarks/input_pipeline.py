r"""Examples/s of the tfds input pipeline alone, next to what the train step consumes.

  python benchmarks/input_pipeline.py [--dataset synthetic_misc/default] [--sizes 128,240] \
      [--batch 16] [--batches 40] [--data_dir DIR] [--train_step benchmarks/results/train_step_cpu.json] \
      [--cores 1,2] [--set input.augment.cats_colour=0.2]

Reads the training stream of `input_pipeline.train_iterator` (decode, resize, augment, pad, batch; host
arrays, no device copy) after a warm-up of 5 batches. With --train_step (the JSON of
benchmarks/train_step.py), prints the ratio of the pipeline's rate to the step's pairs/s at the same
resolution: the pipeline should deliver at least 3x what the step consumes. `--cores 1,2` measures the
pipeline pinned to 1 and to 2 cores (each in a process of its own, its CPU affinity set before TensorFlow
starts): pairs/s per decoding core, from which the cores a host needs per accelerator follow.
`--resume_steps 0,1000,100000` instead times the first batch of a run resumed at each step (what a
restart waits for before its first step: the records of the resumed epoch before the step are skipped).
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from configs import synthetic  # pylint: disable=g-import-not-at-top
from misc_jax import input_pipeline
from tfds_builders import build


def examples_per_second(config, batches: int, warmup: int = 5) -> float:
  it = input_pipeline.train_iterator(config)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.batch_size / (time.perf_counter() - start)


def seconds_to_first_batch(config, start_step: int) -> float:
  start = time.perf_counter()
  next(input_pipeline.train_iterator(config, start_step=start_step))
  return time.perf_counter() - start


def per_core(args) -> list[dict]:
  """Runs this script pinned to each core count of --cores (a fresh process each) and collects its rows."""
  rows = []
  for cores in map(int, args.cores.split(',')):
    out = f'/tmp/input_pipeline_{cores}cores.json'
    cmd = [sys.executable, __file__, '--dataset', args.dataset, '--sizes', args.sizes, '--batch',
           str(args.batch), '--batches', str(args.batches), '--out', out, '--pin', str(cores)]
    cmd += [a for item in args.set for a in ('--set', item)] + (['--data_dir', args.data_dir]
                                                              if args.data_dir else [])
    subprocess.run(cmd, check=True)
    for row in json.load(open(out))['rows']:
      rows.append(dict(row, cores=cores, examples_per_s_per_core=row['examples_per_s'] / cores))
  print('\n| cores | px | examples/s | per core |\n|---|---|---|---|')
  for r in rows:
    print(f'| {r["cores"]} | {r["image_size"]} | {r["examples_per_s"]:.1f} | '
          f'{r["examples_per_s_per_core"]:.1f} |')
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='synthetic_misc/default')
  parser.add_argument('--sizes', default='128,240')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--batches', type=int, default=40)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--train_step', default=None, help='JSON written by benchmarks/train_step.py')
  parser.add_argument('--out', default=None)
  parser.add_argument('--cores', default=None, help='e.g. 1,2: measure pinned to each core count')
  parser.add_argument('--pin', type=int, default=0, help=argparse.SUPPRESS)  # set by --cores
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override a config field, e.g. input.augment.cats_colour=0.2')
  parser.add_argument('--resume_steps', default=None, help='e.g. 0,1000,100000: time a resume at each')
  args = parser.parse_args()
  if args.cores:
    rows = per_core(args)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(dict(dataset=args.dataset, date=time.strftime('%Y-%m-%d'), batch=args.batch,
                       settings=args.set, rows=rows), f, indent=2)
    return
  if args.pin:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.pin])

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
      for item in args.set:
        key, _, value = item.partition('=')
        config.update_from_flattened_dict({key: ast.literal_eval(value)})
    if args.resume_steps:
      for step in map(int, args.resume_steps.split(',')):
        seconds = seconds_to_first_batch(config, step)
        print(f'| {size} | resumed at step {step:,} ({step * args.batch:,} pairs in): first batch in '
              f'{seconds:.2f} s | | |', flush=True)
        rows.append(dict(image_size=size, resume_step=step, seconds_to_first_batch=seconds))
      continue
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
