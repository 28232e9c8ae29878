r"""Per-device memory of one whole training step on a device mesh (batch x fsdp x spatial).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/mesh_memory.py \
      --config configs/kbcnet_spair.py --set input.image_size=1024 --meshes 1,1,1:1,1,2:1,1,8 \
      [--pairs 1] [--out benchmarks/results/mesh_memory_cpu.json]

For each config and mesh (batch, fsdp, spatial; on the first batch * fsdp * spatial devices), compiles the
real jitted step (`train.compile_step`: forward, loss, backward, AdamW; under `jax.set_mesh`, as
training runs it) for `--pairs` pairs per data-parallel group, and reads the compiled SPMD program's
memory analysis, which is per device: temporaries, and arguments (this device's shards of the state and
of the batch). Nothing runs, so programs far larger than this machine are planned. XLA:CPU's plan is not
an accelerator's (it fuses and schedules differently; docs/launch.md says where that shows).
"""

import argparse
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from misc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from tfds_builders import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/train_step.py)

GIB = 2 ** 30


def step_memory(config: ml_collections.ConfigDict, mesh_shape, pairs: int) -> dict:
  """Per-device GiB of one compiled training step of `config` on a mesh of `mesh_shape`."""
  config = config.copy_and_resolve_references()
  config.mesh.batch, config.mesh.fsdp, config.mesh.spatial = mesh_shape
  config.batch_size = pairs * mesh_shape[0] * mesh_shape[1]
  mesh = sharding.make_mesh(config, jax.devices()[:int(np.prod(mesh_shape))])
  model_module, model = state_lib.create_model(config)
  state, shardings = state_lib.sharded_shapes(config, model, mesh)
  host = next(input_pipeline.train_iterator(config, steps_per_batch=1))  # [1, batch, ...]; shapes only
  batch_sharding = sharding.batch_sharding(mesh, stacked=True)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), host)
  rep = sharding.replicated(mesh)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  flags = jax.ShapeDtypeStruct((len(mesh.devices.flat),), bool,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                                   sharding.AXES)))
  step = train.compile_step(config, model_module, mesh, shardings)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    stats = step.lower(state, batch, rng, flags).compile().memory_analysis()
  return dict(temp_gib=stats.temp_size_in_bytes / GIB, argument_gib=stats.argument_size_in_bytes / GIB,
              total_gib=(stats.temp_size_in_bytes + stats.argument_size_in_bytes) / GIB,
              compile_s=time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='experiment configs, comma-separated')
  parser.add_argument('--meshes', default='1,1,1:1,1,2:1,1,8', help='batch,fsdp,spatial shapes, ":"-separated')
  parser.add_argument('--pairs', type=int, default=1, help='pairs per data-parallel group')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE')
  parser.add_argument('--data_dir', default=None, help='TFDS dir holding synthetic_misc/tiny (shapes only)')
  parser.add_argument('--out', default=None, help='JSON file for the results')
  args = parser.parse_args()
  data_dir = args.data_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
  build.build('synthetic_misc/tiny', data_dir)
  print(f'# {jax.device_count()} {jax.devices()[0].platform} devices; jax {jax.__version__}; '
        f'{args.pairs} pair(s) per data-parallel group\n')
  print('| config | overrides | px | mesh (batch, fsdp, spatial) | temp GiB | args GiB | total GiB | '
        'compile s |\n' + '|---' * 8 + '|')
  rows = []
  for spec in args.config.split(','):
    config = train_step.plan_config(spec, data_dir, args.set)
    for shape in args.meshes.split(':'):
      shape = tuple(int(n) for n in shape.split(','))
      row = dict(config=spec, overrides=args.set, image=config.input.image_size, mesh=shape,
                 **step_memory(config, shape, args.pairs))
      rows.append(row)
      print(f'| {spec} | {" ".join(args.set) or "-"} | {row["image"]} | {shape} | {row["temp_gib"]:.2f} | '
            f'{row["argument_gib"]:.2f} | {row["total_gib"]:.2f} | {row["compile_s"]:.0f} |', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, pairs=args.pairs, rows=rows,
                     date=time.strftime('%Y-%m-%d')), f, indent=2)


if __name__ == '__main__':
  main()
