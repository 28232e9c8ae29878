r"""Training throughput of KBCNet: pairs/s, step time, XLA FLOPs, and the fraction of a peak reached.

  python benchmarks/train_step.py [--variants kbcnet_tiny,kbcnet_r101] [--sizes 240,512] \
      [--dtypes float32,bfloat16] [--chunk_rows 0,4] [--batch 1] [--steps 3] [--feature_stride 0] \
      [--steps_per_dispatch 1,4,16] [--set model.fold_batchnorm=False] \
      [--peak_tflops P] [--profile DIR] [--out benchmarks/results/train_step_cpu.json]
  python benchmarks/train_step.py --config configs/kbcnet_spair.py,configs/misc210k_dualpath.py

Times the real jitted training step (`train.compile_step`: forward, loss, backward, AdamW; on config.mesh,
by default data parallel over every device) on random inputs of fixed shape
(the input pipeline is benchmarks/input_pipeline.py's), one pair per device by default, feature stride 16
for ResNet variants (a 15 x 15 grid at 240 px, 32 x 32 at 512) and 8 for the tiny one unless
`--feature_stride` says otherwise. FLOPs per step come from XLA's cost analysis of the step lowered for
the CPU (the same count on every backend); the fraction is of a matmul measured in the same run (float32
2048^3 on a CPU, bfloat16 8192^3 on an accelerator), or of `--peak_tflops` when given (a datasheet peak).
Memory: XLA's plan of the compiled step (temporaries, arguments) and, on a GPU or TPU, the allocator's peak
so far in the process (run one configuration per process to read one step's peak). `--chunk_rows` times
the memory-bounded decoder (model.decoder_chunk_rows) next to the plain one. `--config` times experiment
configs as they are (model, image size, dtype, chunking, frozen stages), e.g. configs/kbcnet_spair.py;
`--profile DIR` adds the cost of each model module and operation from a profile. A compile counter fails
the run if any timed step compiles again.
"""

import argparse
import ast
import collections
import copy
import glob
import gzip
import importlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
from jax import monitoring
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's configs/
from configs import synthetic  # pylint: disable=g-import-not-at-top
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from misc_jax.models import kbcnet
from misc_jax.ops import center_pivot_cpu

_COMPILES = []
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == '/jax/core/compile/backend_compile_duration' else None)


def matmul_gflops(n: int, dtype: str, reps: int = 10):
  """GFLOP/s of one n^3 matmul in `dtype`, the median of `reps` timed calls after a warm-up."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e9


def random_batch(config, batch: int):
  """A batch of the pipeline's layout [batch, ...] with random images and keypoints."""
  rng = np.random.default_rng(0)
  s, i, k = config.input.image_size, config.input.max_instances, config.input.max_keypoints
  shape = (batch,)

  def side():
    kps = rng.uniform(0.1 * s, 0.9 * s, shape + (i, k, 2)).astype(np.float32)
    return {'image': rng.integers(0, 256, shape + (s, s, 3), dtype=np.uint8), 'keypoints': kps,
            'keypoint_valid': np.ones(shape + (i, k), bool),
            'bboxes': np.tile(np.array([0, 0, s, s], np.float32), shape + (i, 1)),
            'instance_valid': np.ones(shape + (i,), bool), 'masks': np.zeros(shape + (i, s, s), bool),
            'has_masks': np.zeros(shape, bool), 'scale': np.ones(shape + (2,), np.float32)}

  return {'source': side(), 'target': side(), 'category': np.zeros(shape, np.int32),
          'valid': np.ones(shape, bool)}


def benchmark_config(variant: str, size: int, dtype: str, batch_size: int, chunk_rows: int = 0,
                     feature_stride: int = 0):
  """configs/synthetic.py with the variant, input size, dtype, decoder_chunk_rows and feature stride (0:
  8 for the tiny variant, 16 for ResNets); one instance of 16 keypoints per side."""
  config = synthetic.get_config()
  with config.unlocked():
    config.model.update(variant=variant, **kbcnet.decode_variant(variant))
    config.model.dtype = dtype
    config.model.decoder_chunk_rows = chunk_rows
    config.model.feature_stride = feature_stride or (8 if variant == 'kbcnet_tiny' else 16)
    config.input.image_size = size
    config.input.max_instances = 1
    config.input.max_keypoints = 16
    config.batch_size = batch_size
  return config


def model_flops(step_fn, *args) -> float:
  """XLA's FLOP count of `step_fn(*args)` (args: one device's share), lowered for the CPU whatever the
  device, so that every backend reports the same count: XLA:GPU's count of a compiled step leaves out
  the convolutions it hands to cuDNN, and no backend sees inside our CPU kernels' custom calls, so the
  count is of XLA's own centre-pivot convolutions. A loop body (the chunked decoder's) counts once."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  with center_pivot_cpu.xla_only():
    return jax.jit(step_fn).trace(*abstract).lower(lowering_platforms=('cpu',)).cost_analysis()['flops']


def run_steps(config, host_batch, steps: int, profile_dir: str | None = None) -> dict:
  """Compiles the training step for `host_batch` ([batch, ...], split over config.mesh) and times `steps`
  calls after one warm-up call; raises if a timed call compiles again. Returns times, losses, FLOPs (the
  model's on one device's share of the batch, and the compiled step's as XLA counts it on this backend)
  and XLA's memory plan; with `profile_dir`, also the cost per step of each operation in a profile of
  `steps` more calls. With config.steps_per_dispatch = k > 1 each call runs k steps (train.train_steps,
  the batch repeated k times) and times are per call."""
  mesh = sharding.make_mesh(config)
  model_module, model = state_lib.create_model(config)
  state = state_lib.initial_state(config, model, mesh)
  k = config.get('steps_per_dispatch', 1)
  rng = jax.random.key(0)
  one_step = lambda s, b: train.train_step(s, b, rng, model_module=model_module, config=config)
  share = jax.tree.map(lambda x: x[:len(x) // jax.device_count()], host_batch)
  flops = model_flops(one_step, jax.device_get(state), share)  # one step's, whatever k
  batch = sharding.global_batch(mesh, jax.tree.map(lambda x: np.repeat(x[None], k, 0), host_batch),
                                stacked=True)  # [k, batch, ...] on the devices, once
  step = train.compile_step(config, model_module, mesh, jax.tree.map(lambda x: x.sharding, state))
  go = sharding.flags(mesh, False)
  start = time.perf_counter()
  compiled = step.lower(state, batch, rng, go).compile()
  compile_s = time.perf_counter() - start
  compiled_flops = (compiled.cost_analysis() or {}).get('flops', float('nan'))
  memory = compiled.memory_analysis()
  state, metrics, _ = step(state, batch, rng, go)  # warm-up (the first call also compiles)
  losses = [float(np.ravel(metrics['loss'])[-1])]
  compiles_before = len(_COMPILES)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics, _ = step(state, batch, rng, go)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    losses.append(float(np.ravel(metrics['loss'])[-1]))
  if len(_COMPILES) != compiles_before:
    raise RuntimeError(f'{len(_COMPILES) - compiles_before} recompilations during timed steps')
  device_stats = jax.local_devices()[0].memory_stats() or {}  # GPU/TPU: the allocator's peak so far
  run = dict(times=times, losses=losses, compile_s=compile_s, flops=flops, compiled_flops=compiled_flops,
             temp_gib=memory.temp_size_in_bytes / 2**30, argument_gib=memory.argument_size_in_bytes / 2**30,
             peak_gib=device_stats.get('peak_bytes_in_use', float('nan')) / 2**30)
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics, _ = step(state, batch, rng, go)
        jax.block_until_ready(metrics)
    run['costs'] = costs_by_source(profile_dir, compiled.as_text(), steps)
  return run


def costs_by_source(trace_dir: str, hlo: str, steps: int) -> dict:
  """Milliseconds per step of each JAX operation (its name-stack path, e.g.
  'transpose(jvp(KBCNet))/decoder/block0/CenterPivotConv4d_0/conv_b/conv_general_dilated') in the
  profiler's perfetto trace of the compiled module `hlo`. A fusion takes its root instruction's name;
  instructions XLA made without one (e.g. the weight-gradient convolutions it hands to a library) are
  listed as '? <opcode> [<instruction>]'."""
  info, roots, comp = {}, {}, None  # instruction -> (op_name, opcode, called computation)
  for line in hlo.splitlines():
    if line.endswith('{') and not line.startswith(' '):
      comp = line.split()[0].lstrip('%')
      continue
    m = re.match(r'\s*(ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(', line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r'calls=%?([\w.\-]+)', line)
    info[m.group(2)] = (op and op.group(1), m.group(3), called and called.group(1))
    if m.group(1):
      roots[comp] = m.group(2)

  def op_name(instruction):
    name, opcode, called = info[instruction]
    while not name and called and roots.get(called) in info:  # a fusion: its root's
      name, opcode, called = info[roots[called]]
    return name or f'? {opcode} [{instruction}]'

  trace = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  with gzip.open(max(trace, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  costs = collections.Counter()
  for event in events:
    if event.get('ph') != 'X' or event.get('name') not in info:
      continue  # runtime bookkeeping, not an HLO instruction
    name = re.sub(r'^(jit\([^)]*\)/)*', '', op_name(event['name']))
    costs[name] += event['dur'] / 1e3 / steps
  return dict(costs.most_common())


def by_module(costs: dict) -> dict:
  """Per-step milliseconds by model submodule (2 levels deep, e.g. 'decoder/block0'; a ResNet stage's
  blocks together) and pass ('forward', 'backward'; 'unknown' for instructions XLA made without a name)."""
  table = collections.defaultdict(lambda: {'forward': 0., 'backward': 0., 'unknown': 0.})
  for name, ms in costs.items():
    inside = re.search(r'jvp\((\w+)\)+/(.*)', name)  # inside the model's apply: jvp(KBCNet)/decoder/...
    parts = inside.group(2).split('/')[:-1] if inside else []  # drop the primitive
    if name.startswith('?'):
      module, kind = f'unnamed: {name.split()[1]} (XLA-made)', 'unknown'
    else:
      module = re.sub(r'_\d+$', '', '/'.join(parts[:2]))  # backbone/layer3_12 -> backbone/layer3
      module = module or (f'{inside.group(1)} (top level)' if inside else 'loss, optimiser')
      kind = 'backward' if 'transpose(' in name else 'forward'
    table[module][kind] += ms
  return dict(sorted(table.items(), key=lambda kv: -sum(kv[1].values())))


def measure(config, per_device: int, steps: int, profile_dir: str | None = None) -> dict:
  devices = jax.local_device_count()
  with config.unlocked():
    config.batch_size = devices * per_device
    config.total_steps = config.total_steps or 1000  # epoch-based configs: the schedule does not matter
  run = run_steps(config, random_batch(config, devices * per_device), steps, profile_dir)
  k = config.get('steps_per_dispatch', 1)
  seconds = statistics.median(run['times']) / k  # per training step
  size = config.input.image_size
  return dict(model=config.model.get('name', 'kbcnet'), variant=config.model.variant, image_size=size,
              freeze_stages=config.model.get('freeze_stages'),
              hyperpixels=str(config.model.get('hyperpixels')),
              grid=size // config.model.feature_stride, dtype=config.model.dtype,
              chunk_rows=config.model.get('decoder_chunk_rows', 0), batch=config.batch_size,
              steps_per_dispatch=k, step_s=seconds, pairs_per_s=config.batch_size / seconds,
              gflop_per_step=run['flops'] / 1e9,
              compiled_gflop_per_step=run['compiled_flops'] / 1e9,
              gflops=run['flops'] / 1e9 / seconds, compile_s=run['compile_s'], recompiles=0,
              temp_gib=run['temp_gib'], argument_gib=run['argument_gib'], peak_gib=run['peak_gib'],
              **({'costs_ms': run['costs']} if profile_dir else {}))


def load_config(spec: str):
  """'configs/kbcnet_spair.py' or 'configs/misc210k_dualpath.py:synthetic' -> its ConfigDict."""
  path, _, arg = spec.partition(':')
  module = importlib.import_module(os.path.splitext(os.path.normpath(path))[0].replace(os.sep, '.'))
  return module.get_config(arg or None)


def plan_config(spec: str, data_dir: str, overrides=()):
  """A config to compile, not to train: `spec` (load_config) reading the tiny synthetic split from
  data_dir at the config's own input sizes, with FIELD=VALUE `overrides`."""
  config = load_config(spec)
  with config.unlocked():
    config.dataset.name, config.dataset.data_dir = 'synthetic_misc/tiny', data_dir
    config.input.data_shards = 1
    config.input.max_instances = 3  # the tiny split's most
    config.total_steps = config.total_steps or 1000
    for item in overrides:
      key, _, value = item.partition('=')
      config.update_from_flattened_dict({key: literal(value)})
  return config


def literal(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def print_costs(name: str, costs: dict, top: int = 12):
  total = sum(costs.values())
  print(f'\n{name}: {total:.1f} ms per step in the profile; by module:\n')
  print('| module | forward ms | backward ms | pass unknown ms | share |\n|---|---|---|---|---|')
  for module, ms in by_module(costs).items():
    print(f'| {module} | {ms["forward"]:.1f} | {ms["backward"]:.1f} | {ms["unknown"]:.1f} | '
          f'{sum(ms.values()) / total:.1%} |')
  print(f'\ntop {top} operations:\n\n| ms | share | operation |\n|---|---|---|')
  for op, ms in list(costs.items())[:top]:
    print(f'| {ms:.1f} | {ms / total:.1%} | {op} |')
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default='kbcnet_tiny,kbcnet_r101')
  parser.add_argument('--sizes', default='240,512')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=1, help='pairs per device')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--chunk_rows', default='0',
                      help='decoder_chunk_rows values to time (0: the whole volume at once)')
  parser.add_argument('--config', default=None,
                      help='config files to time instead of the sweep, e.g. configs/kbcnet_spair.py')
  parser.add_argument('--feature_stride', type=int, default=0,
                      help='image pixels per feature cell (0: 8 for kbcnet_tiny, 16 for ResNets)')
  parser.add_argument('--steps_per_dispatch', default='1',
                      help='training steps per call to time, e.g. 1,4,16 (config.steps_per_dispatch)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='override a config field of every configuration, e.g. model.freeze_stages=2')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help="the device's peak (default: the matmul measured here)")
  parser.add_argument('--profile', default=None, metavar='DIR',
                      help='also profile each configuration (traces under DIR) and print its top costs')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  device = jax.devices()[0]
  # The measured reference: float32 2048^3 on a CPU; on an accelerator bfloat16 8192^3, its fastest path.
  n, dtype = (2048, 'float32') if device.platform == 'cpu' else (8192, 'bfloat16')
  matmul, matmul_name = matmul_gflops(n, dtype), f'{dtype} {n}^3 matmul'
  peak = args.peak_tflops * 1e3 if args.peak_tflops else matmul
  machine = f'{device.device_kind} x{jax.local_device_count()}, {os.cpu_count()} CPUs, {platform.processor()}'
  print(f'# {machine}; jax {jax.__version__}; {matmul_name} measured: {matmul:.1f} GFLOP/s; peak used: '
        f'{peak:.1f} GFLOP/s ({"given" if args.peak_tflops else "the matmul"})\n')
  print('| model | px | grid | dtype | chunk rows | batch | step s | pairs/s | GFLOP/step | GFLOP/s '
        '| / peak | compile s | XLA temp GiB | args GiB | device peak GiB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  if args.config:
    configs = [(spec, load_config(spec)) for spec in args.config.split(',')]
  else:
    configs = [(f'{variant}_{size}_{dtype}_rows{rows}',
                benchmark_config(variant, size, dtype, 1, rows, args.feature_stride))
               for variant in args.variants.split(',') for size in map(int, args.sizes.split(','))
               for dtype in args.dtypes.split(',') for rows in map(int, args.chunk_rows.split(','))]
  rows = []
  for (name, config), k in itertools.product(configs, map(int, args.steps_per_dispatch.split(','))):
    config = copy.deepcopy(config)
    with config.unlocked():
      config.steps_per_dispatch = k
      for item in args.set:
        key, _, value = item.partition('=')
        config.update_from_flattened_dict({key: literal(value)})
    name += f' k={k}' + ''.join(f' {item}' for item in args.set)
    row = measure(config, args.batch, args.steps,
                  args.profile and os.path.join(args.profile, re.sub(r'\W', '_', name)))
    row['fraction_of_peak'] = row['gflops'] / peak
    rows.append(row)
    settings = f' k={k}' * (k > 1) + ''.join(' ' + item for item in args.set)
    print(f'| {row["model"]} {row["variant"]}{settings} | {row["image_size"]} | {row["grid"]} | '
          f'{row["dtype"]} | '
          f'{row["chunk_rows"] or "-"} | {row["batch"]} | {row["step_s"]:.3f} | {row["pairs_per_s"]:.2f} | '
          f'{row["gflop_per_step"]:.1f} | {row["gflops"]:.1f} | {row["fraction_of_peak"]:.3f} | '
          f'{row["compile_s"]:.1f} | {row["temp_gib"]:.2f} | {row["argument_gib"]:.2f} | '
          f'{row["peak_gib"]:.2f} |', flush=True)
    if args.profile:
      print_costs(name, row['costs_ms'])
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(machine=machine, date=time.strftime('%Y-%m-%d'), jax=jax.__version__,
                     peak_gflops=peak, matmul=matmul_name, matmul_gflops=matmul, rows=rows), f, indent=2)


if __name__ == '__main__':
  main()
