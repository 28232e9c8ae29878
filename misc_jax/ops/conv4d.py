"""4D convolutions over correlation volumes [B, Ha, Wa, Hb, Wb, C] (see ops/__init__.py for the layout).

`CenterPivotConv4d` is HSNet's efficient factorisation: a 2D convolution over the source dims plus a 2D
convolution over the target dims (both biased), i.e. a 4D kernel that is non-zero only on the two planes
through its centre. `Conv4d` is the dense 4D convolution of NC-Net / CHM, the reference and ablation
baseline. Both are PyTorch-style cross-correlations with zero padding.

The two branches must give the same output shape. They do whenever the padding keeps each branch's
output at the stride's size (padding = kernel // 2, the default and HSNet's choice everywhere): the source
branch runs at the target positions the target stride keeps, the target branch at the source positions the
source stride keeps. Other paddings make them disagree; HSNet then (target padding 0 only) sums the source
branch over all target positions, bias included, and squeezes the result to a 4D tensor, which is neither
a 4D convolution nor a volume a decoder can continue with. We refuse such settings with an error instead.
"""

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from misc_jax.ops import center_pivot_cpu


def _pairs(padding):
  return [(p, p) for p in padding]


def _conv2d(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loop_conv2d(x, kernel, strides, padding):
  return _conv2d(x, kernel, strides, padding)


def _loop_conv2d_fwd(x, kernel, strides, padding):
  return _conv2d(x, kernel, strides, padding), (x, kernel)


def _loop_conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  (kh, kw), (ho, wo) = kernel.shape[:2], dy.shape[1:3]
  zero = jnp.zeros((), dy.dtype)
  # dx: dy spread onto the input grid (stride - 1 zeros between entries) and padded to n + k - 1 entries,
  # then a 'VALID' convolution with the flipped kernel.
  spread = [(0, 0, 0)]
  for k, s, (lo, _), n, o in zip((kh, kw), strides, padding, x.shape[1:3], (ho, wo)):
    spread.append((k - 1 - lo, n + lo - 1 - s * (o - 1), s - 1))
  spread.append((0, 0, 0))
  flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3).astype(dy.dtype)
  dx = _conv2d(jax.lax.pad(dy, zero, spread), flipped, (1, 1), 'VALID')
  # dkernel: for each tap, the input values it met contracted with dy; one tap at a time (a loop), so that
  # only one shifted copy of x exists at once.
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)])
  (sh, sw), window = strides, (x.shape[0], strides[0] * (ho - 1) + 1, strides[1] * (wo - 1) + 1, x.shape[3])

  def tap(t):
    met = jax.lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), window)[:, ::sh, ::sw]
    return jnp.einsum('nhwc,nhwo->co', met, dy, preferred_element_type=jnp.float32)

  dkernel = jax.lax.map(tap, jnp.arange(kh * kw)).reshape(kernel.shape)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_loop_conv2d.defvjp(_loop_conv2d_fwd, _loop_conv2d_bwd)


def loop_conv2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for flax's nn.Conv (channels last, no dilation, one group), with its
  gradients written as a forward convolution (input) and one dot per kernel tap (kernel).

  Inside a loop body (`chunked_stack`'s lax.map) XLA:CPU (jaxlib 0.10.2) does not hand the backward
  convolutions that autodiff derives to its fast library path: on one 3x3 convolution we measured the kernel
  gradient 25x and the input gradient 4.6x slower than outside a loop. With these gradients a chunked
  KBCNet-R101 training step at 512 px runs 5x faster (docs/performance.md)."""
  del dimension_numbers, precision  # nn.Conv's channels-last layout; default precision
  if any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())) or feature_group_count != 1:
    raise ValueError('loop_conv2d supports neither dilation nor feature groups')
  return _loop_conv2d(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


def center_pivot(x, kernel_a, kernel_b, strides, padding, source_halo: int = 0, conv2d=_conv2d):
  """The centre-pivot convolution without biases, as XLA's two batched 2D convolutions: the source branch
  (kernel_a over Ha, Wa) at every target cell the target stride keeps, plus the target branch (kernel_b
  over Hb, Wb) at every source cell the source stride keeps. The definition every other way of computing
  it must equal (`center_pivot_cpu`). `source_halo`: see `CenterPivotConv4d`."""
  b, ha, wa, hb, wb, c = x.shape
  k, s, p = kernel_a.shape[:2] + kernel_b.shape[:2], tuple(strides), tuple(padding)
  # Source branch, at every target position kept by the target stride.
  xa = x[:, :, :, ::s[2], ::s[3]]
  hb2, wb2 = xa.shape[3:5]
  xa = xa.transpose(0, 3, 4, 1, 2, 5).reshape(b * hb2 * wb2, ha, wa, c)  # [B Hb' Wb', Ha, Wa, C]
  ya = conv2d(xa, kernel_a, s[:2], _pairs(p[:2]))
  ha2, wa2 = ya.shape[1:3]
  ya = ya.reshape(b, hb2, wb2, ha2, wa2, -1).transpose(0, 3, 4, 1, 2, 5)  # [B, Ha', Wa', Hb', Wb', O]
  # Target branch, at every source position (halo rows excluded).
  xb = x[:, source_halo:ha - source_halo:s[0], ::s[1]]
  xb_grid = xb.shape[1:3]
  yb = conv2d(xb.reshape(-1, hb, wb, c), kernel_b, s[2:], _pairs(p[2:]))  # [B Ha' Wa', Hb', Wb', O]
  yb = yb.reshape(b, *xb_grid, *yb.shape[1:])
  if ya.shape != yb.shape:
    raise ValueError(
        f'CenterPivotConv4d (kernel {k}, strides {s}, padding {p}): on input {x.shape} the source branch '
        f'gives {ya.shape} and the target branch {yb.shape}. The branches agree only when the padding '
        'keeps each at the stride\'s size (padding = kernel // 2); HSNet sums such mismatched branches '
        'into a 4D tensor, which we do not reproduce.')
  return ya + yb


class _ConvParams(nn.Module):
  """The parameters of one 2D branch, as nn.Conv names and initialises them: kernel [kh, kw, C, O], bias."""
  features: int
  kernel_size: Sequence[int]

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, in_features, self.features))
    return kernel, self.param('bias', nn.initializers.zeros_init(), (self.features,))


class CenterPivotConv4d(nn.Module):
  """HSNet's CenterPivotConv4d; stride (1, 1, s, s) subsamples the target dims only.

  kernel_size, strides, padding are 4-tuples (source h, source w, target h, target w); padding defaults to
  kernel // 2. Params: conv_a (source dims; HSNet's conv1) and conv_b (target dims; HSNet's conv2), each a
  kernel and a bias. On CPU in float32 the whole convolution runs as one pass over the volume in C++
  (`center_pivot_cpu`); elsewhere as XLA's two convolutions (`center_pivot`).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3, 3, 3)
  strides: Sequence[int] = (1, 1, 1, 1)
  padding: Sequence[int] | None = None
  dtype: jnp.dtype | None = None
  loop_grads: bool = False  # gradients by `loop_conv2d`, for blocks run inside a loop body

  @nn.compact
  def __call__(self, x, source_halo: int = 0):
    """`source_halo` > 0: x is a slab of a larger volume carrying that many extra source rows above and
    below the rows to compute; they stand in for the zero padding of the source rows (`chunked_block`)."""
    k, s = tuple(self.kernel_size), tuple(self.strides)
    p = tuple(self.padding) if self.padding is not None else tuple(n // 2 for n in k)
    if source_halo and (s[0] != 1 or source_halo > p[0]):
      raise ValueError(f'source_halo {source_halo} needs source stride 1 and padding >= the halo')
    p = (p[0] - source_halo, *p[1:])
    kernel_a, bias_a = _ConvParams(self.features, k[:2], name='conv_a')(x.shape[-1])
    kernel_b, bias_b = _ConvParams(self.features, k[2:], name='conv_b')(x.shape[-1])
    x, kernel_a, kernel_b, bias_a, bias_b = nn.dtypes.promote_dtype(x, kernel_a, kernel_b, bias_a, bias_b,
                                                                    dtype=self.dtype)
    if self.loop_grads or source_halo:
      y = center_pivot(x, kernel_a, kernel_b, s, p, source_halo, loop_conv2d if self.loop_grads else _conv2d)
      return y + (bias_a + bias_b)
    return center_pivot_cpu.center_pivot(x, kernel_a, kernel_b, bias_a + bias_b, s, p, center_pivot)


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


def strides_4d(stride: int, stride_dims: str) -> tuple[int, int, int, int]:
  """A decoder block's stride on the 'source' dims (HSNet: the image predicted on keeps its resolution)
  or on the 'target' dims."""
  if stride_dims not in ('source', 'target'):
    raise ValueError(f'stride_dims {stride_dims!r}: expected "source" or "target"')
  return (stride, stride, 1, 1) if stride_dims == 'source' else (1, 1, stride, stride)


class CenterPivotBlock(nn.Module):
  """Center-pivot conv -> GroupNorm -> ReLU, the unit of HSNet's and KBCNet's 4D decoders."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  stride_dims: str = 'target'
  groups: int = 4
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    x = CenterPivotConv4d(self.features, (k,) * 4, strides_4d(self.stride, self.stride_dims),
                          dtype=self.dtype)(x)
    x = nn.GroupNorm(num_groups=self.groups, dtype=self.dtype)(x)
    return nn.relu(x)


def unstrided_first(stride_dims: str, volume):
  """A volume [B, Ha, Wa, Hb, Wb, ...] with the dims of the image the decoder does not stride first (the
  target's when it strides the source: a transpose), and back: the layout `chunked_stack` and
  `spatial_stack` cut into rows."""
  return volume if stride_dims == 'target' else jnp.moveaxis(volume, (3, 4), (1, 2))


def _row_blocks(stack: 'CenterPivotStack', params, loop_grads: bool):
  """The stack's blocks as pure functions on slabs of rows of an `unstrided_first` volume, for
  `chunked_stack` and `spatial_stack`: (halos, conv, norm_relu). `conv(i, x)` is block i's convolution of
  a slab that carries halos[i] extra rows above and below (standing in for the padding of the rows) ->
  float32 [B, n, W, H', W', G, O / G]; `norm_relu(i, y, mean, inv)` is its GroupNorm with the given
  whole-volume statistics ([B, G] each; flax's formula: fast variance, eps 1e-6) and ReLU."""
  blocks = [CenterPivotConv4d(f, (k,) * 4, (1, 1, s, s), dtype=stack.dtype, loop_grads=loop_grads,
                              parent=None)
            for f, k, s in zip(stack.features, stack.kernel_sizes, stack.strides, strict=True)]
  halos = [k // 2 for k in stack.kernel_sizes]

  def conv(i, x):
    conv_params = params[f'block{i}']['CenterPivotConv4d_0']
    if stack.stride_dims == 'source':  # the branches trade places: conv_a convolves the dims that come first
      conv_params = {'conv_a': conv_params['conv_b'], 'conv_b': conv_params['conv_a']}
    y = blocks[i].apply({'params': conv_params}, x, source_halo=halos[i])
    return y.astype(jnp.float32).reshape(*y.shape[:-1], stack.groups, -1)

  def norm_relu(i, y, mean, inv):
    mean, inv = (v[:, None, None, None, None, :, None] for v in (mean, inv))
    gn = params[f'block{i}']['GroupNorm_0']
    y = ((y - mean) * inv).reshape(*y.shape[:-2], -1) * gn['scale'] + gn['bias']
    return nn.relu(y).astype(stack.dtype or y.dtype)

  return halos, conv, norm_relu


def _moments(y):
  """Per (pair, group) means of y and y^2 of conv's output [B, n, W, H', W', G, O / G]."""
  return jnp.mean(y, (1, 2, 3, 4, 6)), jnp.mean(y * y, (1, 2, 3, 4, 6))


def _inverse_std(mean, square):
  return jax.lax.rsqrt(jnp.maximum(square - mean * mean, 0.) + 1e-6)


def chunked_stack(stack: 'CenterPivotStack', params, volume_rows: Callable, height: int, rows: int,
                  head: Callable = lambda out, inp: out):
  """The stack's output, `rows` rows at a time, in memory bounded by one chunk.

  The chunks are rows of the image whose dims the stack does not stride (the target's for the default
  source strides, the source's for target strides), and everything here is in the layout
  `unstrided_first` gives, that image's dims first: `volume_rows(start, n)` returns the stack's input for
  rows [start, start + n) of it, [B, n, W, H, W, C], zeros outside [0, height) (the convolutions' padding);
  it may compute them on the fly (KBCNet computes the correlation rows from the features), so the whole
  input volume never exists either. `head(out, inp)` maps each chunk of the output (and the input rows it
  came from) to what is kept, e.g. one score channel. The result is in that layout too.

  GroupNorm needs statistics over the whole volume, so block i's are accumulated in a pass of their own
  that recomputes blocks 0..i-1 on each chunk (with a halo of kernel // 2 rows per block); a last pass
  computes the output. Every chunk is a `jax.checkpoint`ed loop body whose only residual is its row offset,
  so the backward pass too holds one chunk at a time; the blocks' gradients there are `loop_conv2d`'s.
  Values match the plain stack up to float32 summation order; the price is len(blocks) extra forward
  passes of the first blocks.
  """
  if height % rows:
    raise ValueError(f'chunk_rows={rows} must divide the height {height}')
  halos, conv, norm_relu = _row_blocks(stack, params, loop_grads=True)
  starts = jnp.arange(0, height, rows)
  stats = []  # (mean, 1 / std) of each block, [B, G] each

  def normalize(i, y, first_row):  # rows outside the volume are the next block's zero padding
    row = first_row + jnp.arange(y.shape[1])
    inside = (row >= 0) & (row < height)
    return jnp.where(inside[:, None, None, None, None], norm_relu(i, y, *stats[i]), 0)

  def run(start, depth):  # blocks 0..depth-1 on rows [start, start + rows); then block depth's conv
    margin = total = sum(halos[:depth + 1])
    x = inp = volume_rows(start - total, rows + 2 * total)
    for i in range(depth):
      margin -= halos[i]
      x = normalize(i, conv(i, x), start - margin)
    if depth == len(halos):
      return head(x, jax.lax.dynamic_slice_in_dim(inp, total, rows, axis=1))
    return conv(depth, x)

  for depth in range(len(halos)):
    moments = jax.checkpoint(lambda start, depth=depth: _moments(run(start, depth)))
    means, squares = jax.lax.map(moments, starts)  # [chunks, B, G]; equal-size chunks
    mean = means.mean(0)
    stats.append((mean, _inverse_std(mean, squares.mean(0))))
  out = jax.lax.map(jax.checkpoint(lambda start: run(start, len(halos))), starts)  # [chunks, B, rows, ..]
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(out.shape[0], height, *out.shape[3:])


def _with_halo(x, h: int, axis: str):
  """This chip's rows x [B, n, ...] -> [B, n + 2h, ...]: the last h rows of the chip before it on mesh
  axis `axis` above, the first h of the chip after it below, zeros past the volume's ends (padding)."""
  if not h:
    return x
  if x.shape[1] < h:
    raise ValueError(f'{x.shape[1]} rows per chip cannot supply a halo of {h} rows: use fewer spatial chips')
  n = jax.lax.axis_size(axis)
  above = jax.lax.ppermute(x[:, -h:], axis, [(j, j + 1) for j in range(n - 1)])  # the first chip gets 0s
  below = jax.lax.ppermute(x[:, :h], axis, [(j + 1, j) for j in range(n - 1)])
  return jnp.concatenate([above, x, below], axis=1)


def spatial_stack(stack: 'CenterPivotStack', params, x, axis: str = 'spatial'):
  """The stack's output for this chip's rows, inside `jax.shard_map` over a mesh whose axis `axis`
  splits a volume by rows: x is this chip's slab [B, n, W, H, W, C] of an `unstrided_first` volume (rows
  of the image the stack does not stride), and so is the result.

  Before each block the chips swap halos of kernel // 2 rows with their neighbours (`ppermute`: two
  messages of h rows each, whatever the volume's size), so every convolution sees what it would on the
  whole volume; GroupNorm's statistics are means over the whole volume (`pmean` of the chips' equal-size
  slabs). The same decomposition as `chunked_stack`, with chips in place of loop iterations: each holds
  1/n of the volume and of every block's activations.
  """
  halos, conv, norm_relu = _row_blocks(stack, params, loop_grads=False)
  for i, h in enumerate(halos):
    y = conv(i, _with_halo(x, h, axis))
    mean, square = (jax.lax.pmean(v, axis) for v in _moments(y))
    x = norm_relu(i, y, mean, _inverse_std(mean, square))
  return x


class CenterPivotStack(nn.Module):
  """A sequence of CenterPivotBlocks, strided on the `stride_dims` ('source' or 'target');
  `chunked_stack` computes the same in bounded memory, `spatial_stack` split over chips."""
  features: Sequence[int]
  kernel_sizes: Sequence[int]
  strides: Sequence[int]
  groups: int = 4
  dtype: jnp.dtype | None = None
  stride_dims: str = 'target'
  remat: bool = False  # recompute each block in the backward pass instead of keeping its activations

  @nn.compact
  def __call__(self, x):
    block = nn.remat(CenterPivotBlock) if self.remat else CenterPivotBlock
    for i, (f, k, s) in enumerate(zip(self.features, self.kernel_sizes, self.strides, strict=True)):
      x = block(f, k, s, self.stride_dims, self.groups, self.dtype, name=f'block{i}')(x)
    return x
