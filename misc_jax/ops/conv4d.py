"""4D convolutions over correlation volumes [B, Ha, Wa, Hb, Wb, C] (see ops/__init__.py for the layout).

`CenterPivotConv4d` is HSNet's efficient factorisation: a 2D convolution over the source dims plus a 2D
convolution over the target dims (both biased), i.e. a 4D kernel that is non-zero only on the two planes
through its centre. `Conv4d` is the dense 4D convolution of NC-Net / CHM, the reference and ablation
baseline. Both are PyTorch-style cross-correlations with zero padding.

Not reproduced: HSNet's "sum/squeeze" path, taken only when the target-dim output of the source branch and
the target branch disagree and the target padding is zero; it sums the source branch over all target
positions (bias included) and returns a 4D tensor. Our source branch always subsamples the target dims by
the target stride first, so both branches agree in shape for every padding.
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pairs(padding):
  return [(p, p) for p in padding]


class CenterPivotConv4d(nn.Module):
  """HSNet's CenterPivotConv4d; stride (1, 1, s, s) subsamples the target dims only.

  kernel_size, strides, padding are 4-tuples (source h, source w, target h, target w); padding defaults to
  kernel // 2. Params: conv_a (source dims; HSNet's conv1) and conv_b (target dims; HSNet's conv2).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3, 3, 3)
  strides: Sequence[int] = (1, 1, 1, 1)
  padding: Sequence[int] | None = None
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, source_halo: int = 0):
    """`source_halo` > 0: x is a slab of a larger volume carrying that many extra source rows above and
    below the rows to compute; they stand in for the zero padding of the source rows (`chunked_block`)."""
    b, ha, wa, hb, wb, c = x.shape
    k, s = tuple(self.kernel_size), tuple(self.strides)
    p = tuple(self.padding) if self.padding is not None else tuple(n // 2 for n in k)
    if source_halo and (s[0] != 1 or source_halo > p[0]):
      raise ValueError(f'source_halo {source_halo} needs source stride 1 and padding >= the halo')
    p = (p[0] - source_halo, *p[1:])
    conv = lambda name, kk, ss, pp: nn.Conv(self.features, kk, ss, _pairs(pp), dtype=self.dtype,
                                            name=name)
    # Source branch, at every target position kept by the target stride.
    xa = x[:, :, :, ::s[2], ::s[3]]
    hb2, wb2 = xa.shape[3:5]
    xa = xa.transpose(0, 3, 4, 1, 2, 5).reshape(b * hb2 * wb2, ha, wa, c)  # [B Hb' Wb', Ha, Wa, C]
    ya = conv('conv_a', k[:2], s[:2], p[:2])(xa)
    ha2, wa2 = ya.shape[1:3]
    ya = ya.reshape(b, hb2, wb2, ha2, wa2, -1).transpose(0, 3, 4, 1, 2, 5)  # [B, Ha', Wa', Hb', Wb', O]
    # Target branch, at every source position (halo rows excluded).
    xb = x[:, source_halo:ha - source_halo:s[0], ::s[1]].reshape(-1, hb, wb, c)  # [B Ha' Wa', Hb, Wb, C]
    yb = conv('conv_b', k[2:], s[2:], p[2:])(xb)
    yb = yb.reshape(b, ha2, wa2, *yb.shape[1:])  # [B, Ha', Wa', Hb', Wb', O]
    return ya + yb


class Conv4d(nn.Module):
  """Dense 4D convolution (NC-Net / CHM semantics): 'same' size, stride 1, zero padding k // 2."""
  features: int
  kernel_size: int = 3
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, k, k, x.shape[-1],
                                                                   self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ('NHWDTC', 'HWDTIO', 'NHWDTC'))
    y = jax.lax.conv_general_dilated(x, kernel, (1,) * 4, [(k // 2, k // 2)] * 4,
                                     dimension_numbers=dn)
    return y + bias.astype(y.dtype)


class CenterPivotBlock(nn.Module):
  """Center-pivot conv -> GroupNorm -> ReLU, the unit of HSNet's and KBCNet's 4D decoders."""
  features: int
  kernel_size: int = 3
  target_stride: int = 1
  groups: int = 4
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.target_stride
    x = CenterPivotConv4d(self.features, (k,) * 4, (1, 1, s, s), dtype=self.dtype)(x)
    x = nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)(x)
    return nn.relu(x)


def chunked_stack(stack: 'CenterPivotStack', params, volume_rows: Callable, height: int, rows: int,
                  head: Callable = lambda out, inp: out):
  """The stack's output, `rows` source rows at a time, in memory bounded by one chunk.

  `volume_rows(start, n)` returns the stack's input for source rows [start, start + n), zeros outside
  [0, height) (the convolutions' padding); it may compute them on the fly (KBCNet computes the
  correlation rows from the features), so the whole input volume never exists either. `head(out, inp)`
  maps each chunk of the output (and the input rows it came from) to what is kept, e.g. one score channel.

  GroupNorm needs statistics over the whole volume, so block i's are accumulated in a pass of their own
  that recomputes blocks 0..i-1 on each chunk (with a halo of kernel // 2 rows per block); a last pass
  computes the output. Every chunk is a `jax.checkpoint`ed loop body whose only residual is its row offset,
  so the backward pass too holds one chunk at a time. Values match the plain stack up to float32 summation
  order; the price is len(blocks) extra forward passes of the first blocks.
  """
  if height % rows:
    raise ValueError(f'chunk_rows={rows} must divide the source height {height}')
  blocks = [CenterPivotConv4d(f, (k,) * 4, (1, 1, s, s), dtype=stack.dtype, parent=None)
            for f, k, s in zip(stack.features, stack.kernel_sizes, stack.target_strides, strict=True)]
  halos = [k // 2 for k in stack.kernel_sizes]
  groups, dtype = stack.groups, stack.dtype
  starts = jnp.arange(0, height, rows)
  stats = []  # (mean, 1 / std) of each block, [B, G] each

  def conv(i, x):  # block i's convolution of a slab -> float32 [B, n - 2 halo, Wa, Hb', Wb', G, O / G]
    y = blocks[i].apply({'params': params[f'block{i}']['CenterPivotConv4d_0']}, x, source_halo=halos[i])
    return y.astype(jnp.float32).reshape(*y.shape[:-1], groups, -1)

  def normalize(i, y, first_row):  # flax GroupNorm's formula (fast variance, eps 1e-6), ReLU, padding
    mean, inv = (v[:, None, None, None, None, :, None] for v in stats[i])
    gn = params[f'block{i}']['GroupNorm_0']
    y = ((y - mean) * inv).reshape(*y.shape[:-2], -1) * gn['scale'] + gn['bias']
    row = first_row + jnp.arange(y.shape[1])
    inside = (row >= 0) & (row < height)  # rows outside the volume are the next block's zero padding
    return jnp.where(inside[:, None, None, None, None], nn.relu(y), 0).astype(dtype or y.dtype)

  def run(start, depth):  # blocks 0..depth-1 on rows [start, start + rows); then block depth's conv
    margin = total = sum(halos[:depth + 1])
    x = inp = volume_rows(start - total, rows + 2 * total)
    for i in range(depth):
      margin -= halos[i]
      x = normalize(i, conv(i, x), start - margin)
    if depth == len(blocks):
      return head(x, jax.lax.dynamic_slice_in_dim(inp, total, rows, axis=1))
    return conv(depth, x)

  for depth in range(len(blocks)):
    def moments(start, depth=depth):  # per (batch, group) means of y and y^2 over one chunk
      y = run(start, depth)
      return jnp.mean(y, (1, 2, 3, 4, 6)), jnp.mean(y * y, (1, 2, 3, 4, 6))
    means, squares = jax.lax.map(jax.checkpoint(moments), starts)  # [chunks, B, G]; equal-size chunks
    mean = means.mean(0)
    var = jnp.maximum(squares.mean(0) - mean * mean, 0.)
    stats.append((mean, jax.lax.rsqrt(var + 1e-6)))
  out = jax.lax.map(jax.checkpoint(lambda start: run(start, len(blocks))), starts)  # [chunks, B, rows, ..]
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(out.shape[0], height, *out.shape[3:])


class CenterPivotStack(nn.Module):
  """A sequence of CenterPivotBlocks; `chunked_stack` computes the same in bounded memory."""
  features: Sequence[int]
  kernel_sizes: Sequence[int]
  target_strides: Sequence[int]
  groups: int = 4
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    blocks = zip(self.features, self.kernel_sizes, self.target_strides, strict=True)
    for i, (f, k, s) in enumerate(blocks):
      x = CenterPivotBlock(f, k, s, self.groups, self.dtype, name=f'block{i}')(x)
    return x
