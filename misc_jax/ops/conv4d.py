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

from typing import Sequence

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
  def __call__(self, x):
    b, ha, wa, hb, wb, c = x.shape
    k, s = tuple(self.kernel_size), tuple(self.strides)
    p = tuple(self.padding) if self.padding is not None else tuple(n // 2 for n in k)
    conv = lambda name, kk, ss, pp: nn.Conv(self.features, kk, ss, _pairs(pp), dtype=self.dtype,
                                            name=name)
    # Source branch, at every target position kept by the target stride.
    xa = x[:, :, :, ::s[2], ::s[3]]
    hb2, wb2 = xa.shape[3:5]
    xa = xa.transpose(0, 3, 4, 1, 2, 5).reshape(b * hb2 * wb2, ha, wa, c)  # [B Hb' Wb', Ha, Wa, C]
    ya = conv('conv_a', k[:2], s[:2], p[:2])(xa)
    ha2, wa2 = ya.shape[1:3]
    ya = ya.reshape(b, hb2, wb2, ha2, wa2, -1).transpose(0, 3, 4, 1, 2, 5)  # [B, Ha', Wa', Hb', Wb', O]
    # Target branch, at every source position.
    xb = x[:, ::s[0], ::s[1]].reshape(-1, hb, wb, c)  # [B Ha' Wa', Hb, Wb, C]
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


class _ScanStep(CenterPivotBlock):
  """A CenterPivotBlock with a scan signature (no carry, x broadcast), for a one-step `nn.scan`."""

  def __call__(self, carry, x):  # pytype: disable=signature-mismatch
    return carry, super().__call__(x)


class CenterPivotStack(nn.Module):
  """A sequence of CenterPivotBlocks.

  `remat=True` is the memory-bounded path: each block's activations are recomputed in the backward pass
  (`jax.checkpoint`), so a step keeps only the block inputs alive; values agree with the plain stack to
  float32 rounding. Each remat block runs as a one-step scan: XLA:CPU drops the optimisation barriers
  that keep a recomputation from being merged back into the forward pass, but it cannot merge across
  loop bodies, so the saving is real on every backend (docs/performance.md has the numbers).
  """
  features: Sequence[int]
  kernel_sizes: Sequence[int]
  target_strides: Sequence[int]
  groups: int = 4
  remat: bool = False
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    remat_step = nn.scan(nn.remat(_ScanStep), variable_broadcast='params',
                         split_rngs={'params': False}, in_axes=nn.broadcast, length=1)
    blocks = zip(self.features, self.kernel_sizes, self.target_strides, strict=True)
    for i, (f, k, s) in enumerate(blocks):  # Named, so remat and plain stacks share params.
      args = (f, k, s, self.groups, self.dtype)
      if self.remat:
        x = remat_step(*args, name=f'block{i}')(None, x)[1][0]  # scan output: [1, ...]
      else:
        x = CenterPivotBlock(*args, name=f'block{i}')(x)
    return x
