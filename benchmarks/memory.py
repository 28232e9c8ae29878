r"""Device memory of one KBCNet training step, naive vs memory-bounded 4D decoder.

  python benchmarks/memory.py [--variant kbcnet_r101] [--sizes 16,32,48,64] [--batch 1] \
      [--chunk_rows 4] [--out benchmarks/results/memory_cpu.json]
  python benchmarks/memory.py --config configs/kbcnet_dinov2_spair.py:vitb14,\
configs/kbcnet_dinov2_spair.py:vitg14 [--set model.freeze_backbone=False] [--batch 1]

For feature grids of size x size per image (input images of size * 8 pixels), compiles the real jitted
training step (`train.train_step`: forward, loss, backward, AdamW update) for one device and reads XLA's
memory analysis: temporary buffers, and arguments (parameters, optimiser state, batch). Nothing runs, so
sizes this machine could not hold are planned from here; on an accelerator the same numbers come from
its compiler. `--config` plans experiment configs as they are (model, image size, dtype, frozen parts;
the whole 4D volume or the config's chunks), with `--set` overrides.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from configs import synthetic  # pylint: disable=g-import-not-at-top
from misc_jax import input_pipeline
from misc_jax import optim
from misc_jax import state as state_lib
from misc_jax import train
from misc_jax.models import kbcnet
from tfds_builders import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/train_step.py)


def step_memory(config, chunk_rows: int) -> dict:
  """Compiled memory (GiB) of one train step for `config` with decoder_chunk_rows = chunk_rows."""
  with config.unlocked():
    config.model.decoder_chunk_rows = chunk_rows
  model_module, model = state_lib.create_model(config)
  size = config.input.image_size
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  state = jax.eval_shape(lambda: optim.create_train_state(
      config, model.apply, dict(model.init(jax.random.key(0), images, images))))
  batch = next(input_pipeline.train_iterator(config))  # [batch, ...]
  step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(0), model_module=model_module,
                                               config=config))
  start = time.perf_counter()
  stats = step.lower(state, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
                     ).compile().memory_analysis()
  gib = lambda n: n / 2**30
  return dict(temp_gib=gib(stats.temp_size_in_bytes), argument_gib=gib(stats.argument_size_in_bytes),
              total_gib=gib(stats.temp_size_in_bytes + stats.argument_size_in_bytes),
              compile_s=time.perf_counter() - start)


def plan_configs(args, data_dir) -> list[dict]:
  """XLA's plan of one step of each --config (one pair per device by default), its data from the tiny
  synthetic split at the config's input sizes."""
  print('| config | settings | px | grid | dtype | temp GiB | args GiB | total GiB |\n' + '|---' * 8 + '|')
  rows = []
  for spec in args.config.split(','):
    config = train_step.plan_config(spec, data_dir, args.set)
    config.batch_size = args.batch
    plan = step_memory(config, config.model.get('decoder_chunk_rows', 0))
    size = config.input.image_size
    rows.append(dict(config=spec, settings=args.set, image=size, **plan))
    print(f'| {spec} | {" ".join(args.set) or "-"} | {size} | {-(-size // config.model.feature_stride)} | '
          f'{config.model.dtype} | {plan["temp_gib"]:.2f} | {plan["argument_gib"]:.2f} | '
          f'{plan["total_gib"]:.2f} |',
          flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='kbcnet_r101', choices=sorted(kbcnet.VARIANTS))
  parser.add_argument('--sizes', default='16,32,48,64', help='feature grid sides')
  parser.add_argument('--batch', type=int, default=1, help='pairs per device')
  parser.add_argument('--chunk_rows', type=int, default=4)
  parser.add_argument('--data_dir', default=None, help='TFDS dir (default: a temporary one)')
  parser.add_argument('--out', default=None, help='JSON file for the results')
  parser.add_argument('--config', default=None, help='experiment configs to plan instead of the sweep')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  args = parser.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp()
  build.build('synthetic_misc/tiny', data_dir)  # only the batch's shapes are used
  device = jax.devices()[0]
  if args.config:
    rows = plan_configs(args, data_dir)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(dict(device=device.device_kind, jax=jax.__version__, batch=args.batch, rows=rows,
                       date=time.strftime('%Y-%m-%d')), f, indent=2)
    return
  print(f'# {device.device_kind}; jax {jax.__version__}; {args.variant}, {args.batch} pair(s) per '
        f'device, memory-bounded path: decoder_chunk_rows={args.chunk_rows}\n')
  print('| grid | image px | naive temp GiB | naive total GiB | chunked temp GiB | chunked total GiB |')
  print('|---|---|---|---|---|---|')
  rows = []
  for size in [int(s) for s in args.sizes.split(',')]:
    config = synthetic.get_config('smoke')
    with config.unlocked():
      config.dataset.data_dir = data_dir
      config.model.update(kbcnet.decode_variant(args.variant))
      config.input.image_size = size * config.model.feature_stride
      config.batch_size = args.batch
      config.input.data_shards = 1
    chunk = args.chunk_rows if size % args.chunk_rows == 0 else 1
    naive, chunked = step_memory(config, 0), step_memory(config, chunk)
    rows.append(dict(grid=size, image=config.input.image_size, chunk_rows=chunk, naive=naive,
                     chunked=chunked))
    print(f'| {size} | {config.input.image_size} | {naive["temp_gib"]:.2f} | {naive["total_gib"]:.2f} '
          f'| {chunked["temp_gib"]:.2f} | {chunked["total_gib"]:.2f} |', flush=True)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(dict(device=device.device_kind, jax=jax.__version__, variant=args.variant,
                     batch=args.batch, rows=rows, date=time.strftime('%Y-%m-%d')), f, indent=2)


if __name__ == '__main__':
  main()
