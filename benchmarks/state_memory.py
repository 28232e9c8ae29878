r"""Per-device bytes of the train state (parameters, AdamW moments, frozen statistics) for each fsdp size.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/state_memory.py \
      [--config configs/synthetic.py,configs/kbcnet_spair.py] [--fsdp 1,2,4,8] [--set FIELD=VALUE] \
      [--out benchmarks/results/state_memory_cpu.json]

For each config and mesh (batch = devices / fsdp, fsdp), compiles the jitted init with the state's
shardings as its output (what `state.initial_state` runs) and reads the compiled program's memory
analysis: the output bytes on one device, i.e. the state each chip holds. Nothing runs, so states far
larger than this machine are measured; the `planned` column is the same sum from the shardings' shard
shapes, as a check. Frozen parameters keep no AdamW moments, so a frozen backbone costs its weights only.
"""

import argparse
import ast
import json
import math
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from misc_jax import sharding  # pylint: disable=g-import-not-at-top
from misc_jax import state as state_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/train_step.py)

GIB = 2 ** 30


def measure(config, fsdp: int) -> dict:
  config = config.copy_and_resolve_references()
  config.mesh.batch, config.mesh.fsdp = -1, fsdp
  config.total_steps = config.total_steps or 1000  # the schedule does not change the state's shapes
  mesh = sharding.make_mesh(config)
  model = state_lib.create_model(config)[1]
  target, shardings = state_lib.sharded_shapes(config, model, mesh)
  planned = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                for x, s in zip(jax.tree.leaves(target), jax.tree.leaves(shardings)))
  start = time.perf_counter()
  init = jax.jit(lambda: jax.tree.leaves(state_lib._fresh_state(config, model)),  # pylint: disable=protected-access
                 out_shardings=jax.tree.leaves(shardings))
  analysis = init.lower().compile().memory_analysis()
  total = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(target))
  return dict(fsdp=fsdp, batch=mesh.shape['batch'], total_gib=total / GIB,
              per_device_gib=analysis.output_size_in_bytes / GIB, planned_gib=planned / GIB,
              compile_s=time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/synthetic.py,configs/kbcnet_spair.py')
  parser.add_argument('--fsdp', default='1,2,4,8')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  print(f'# {jax.device_count()} {jax.devices()[0].platform} devices; jax {jax.__version__}\n')
  print('| config | overrides | state GiB | fsdp | per device GiB (compiled) | planned | compile s |')
  print('|---|---|---|---|---|---|---|')
  rows = []
  for spec in args.config.split(','):
    config = train_step.load_config(spec)
    for item in args.set:
      key, _, value = item.partition('=')
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
      config.update_from_flattened_dict({key: value})
    for fsdp in map(int, args.fsdp.split(',')):
      row = dict(config=spec, overrides=args.set, **measure(config, fsdp))
      rows.append(row)
      print(f'| {spec} | {" ".join(args.set) or "-"} | {row["total_gib"]:.3f} | {fsdp} | '
            f'{row["per_device_gib"]:.3f} | {row["planned_gib"]:.3f} | {row["compile_s"]:.1f} |', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
