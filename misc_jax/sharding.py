"""The device mesh and how arrays are laid out on it: one `jax.jit` program over every chip of every process.

`config.mesh` names the axes: `batch` (data parallel), `fsdp` (data parallel whose chips also split the
train state, ZeRO-3 style) and `spatial` (chips that share pairs and split each pair's 4D correlation
volume and decoder by rows: ops/conv4d.py `spatial_stack`); -1 takes the devices the other axes leave.
The default, every device on `batch`, is plain data parallelism over every chip: what the design's
"pmapped across accelerators" asks for, and what `jax.pmap` itself compiles to since JAX 0.8 (jit over a
one-axis mesh). On multi-slice TPU pods `config.mesh.dcn_batch` slices share the `batch` axis over the
data-centre network, the rest stays on ICI.

A batch is split over the data axes (each chip its own pairs; the `spatial` chips of a pair share them).
A state array is split along its largest dimension that `fsdp` divides when it has at least
`config.mesh.fsdp_min_size` elements, and replicated otherwise; XLA gathers the pieces where the step
needs them.
"""

import collections

import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

AXES = ('batch', 'fsdp', 'spatial')
DATA_AXES = ('batch', 'fsdp')  # the leading (pair) dimension of a batch is split over these


def mesh_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.mesh, or the all-`batch` default for configs saved before the field existed."""
  default = ml_collections.ConfigDict(dict(batch=-1, fsdp=1, spatial=1, dcn_batch=1, fsdp_min_size=2 ** 16))
  if 'mesh' in config:
    default.update(config.mesh)
  return default


def axis_sizes(mesh_cfg, device_count: int) -> tuple[int, ...]:
  """The sizes of AXES on `device_count` devices; at most one -1, which takes the rest."""
  sizes = [mesh_cfg[a] for a in AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or device_count % known:
    raise ValueError(f'config.mesh {dict(zip(AXES, sizes))} does not fit {device_count} devices: the '
                     'axis sizes must multiply to the device count, with at most one -1 for the rest')
  sizes = [device_count // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != device_count:
    raise ValueError(f'config.mesh {dict(zip(AXES, sizes))} uses {int(np.prod(sizes))} devices, but there '
                     f'are {device_count}: set one axis to -1 or make the sizes multiply to {device_count}')
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The mesh of config.mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  m = mesh_config(config)
  sizes = axis_sizes(m, len(devices))
  if m.dcn_batch > 1:  # multi-slice: `batch` spans slices, each slice's chips its ICI mesh
    if sizes[0] % m.dcn_batch:
      raise ValueError(f'config.mesh.dcn_batch={m.dcn_batch} must divide the batch axis ({sizes[0]})')
    ici = (sizes[0] // m.dcn_batch,) + sizes[1:]
    grid = mesh_utils.create_hybrid_device_mesh(ici, (m.dcn_batch,) + (1,) * (len(AXES) - 1), devices)
  else:
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, AXES)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways a batch is split: the product of the data axes (the global batch must divide by it)."""
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def spatial_size() -> int:
  """The `spatial` axis of the mesh the caller set with `jax.set_mesh` (1 without one): how many chips
  split each pair's correlation volume."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get('spatial', 1)


def one_device_mesh() -> jax.sharding.Mesh:
  """Every axis of size 1, on this process's first device (keypoint transfer on a few images)."""
  return jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape((1,) * len(AXES)), AXES)


# ----------------------------------------------------------------------------------------------------------
# The train state.
# ----------------------------------------------------------------------------------------------------------

def fsdp_spec(shape, fsdp: int, min_size: int) -> P:
  """The partition of one state array: its largest dimension that `fsdp` divides, for arrays of at
  least `min_size` elements; replicated otherwise."""
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # largest first; ties: the earlier
    if shape[dim] % fsdp == 0:
      return P(*(['fsdp' if d == dim else None for d in range(len(shape))]))
  return P()


def state_shardings(mesh: jax.sharding.Mesh, abstract_state, config: ml_collections.ConfigDict):
  """A NamedSharding for every leaf of a state (or its abstract shapes), by `fsdp_spec`."""
  min_size = mesh_config(config).fsdp_min_size
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape['fsdp'], min_size)), abstract_state)


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs that carry their target sharding: what Orbax restores straight into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state, shardings)


def put(host_array, like: jax.Array) -> jax.Array:
  """A host (numpy) array laid out as the global array `like`; each process supplies only its own
  shards, so nothing is gathered anywhere."""
  host_array = np.asarray(host_array, like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: host_array[index])


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def bytes_per_device(tree) -> dict[int, int]:
  """{device id: bytes of the tree's shards on it} for the devices of this process."""
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] += shard.data.nbytes
  return dict(out)


# ----------------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------------

def batch_sharding(mesh: jax.sharding.Mesh, stacked: bool = False) -> NamedSharding:
  """Pairs split over the data axes; with `stacked`, batches of several steps [k, B, ...]."""
  return NamedSharding(mesh, P(None, DATA_AXES) if stacked else P(DATA_AXES))


def global_batch(mesh: jax.sharding.Mesh, local_batch, stacked: bool = False):
  """This process's part of a batch (numpy, [B_process, ...] or [k, B_process, ...]) -> global arrays
  [B, ...] split over the data axes; each process contributes its own pairs."""
  sharding = batch_sharding(mesh, stacked)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def local_part(mesh: jax.sharding.Mesh, tree, spec: P = P(DATA_AXES)):
  """The rows of global arrays (split as `spec`) that this process fed in, as numpy."""
  return jax.device_get(multihost_utils.global_array_to_host_local_array(tree, mesh, spec))


def prefetch(batches, mesh: jax.sharding.Mesh, size: int, stacked: bool = False):
  """Global batches `size` ahead of the consumer, so their host-to-device copies overlap the steps."""
  queue = collections.deque()
  for batch in batches:
    queue.append(global_batch(mesh, batch, stacked))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def flags(mesh: jax.sharding.Mesh, value: bool) -> jax.Array:
  """One bool per device, this process's devices set to `value`: a step that reduces it with any()
  tells every process whether any of them raised it (how the processes agree on a preemption)."""
  sharding = NamedSharding(mesh, P(AXES))
  return jax.make_array_from_process_local_data(sharding, np.full(jax.local_device_count(), value))
