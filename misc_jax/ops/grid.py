"""Where the cells of a feature map sit in the image, and resampling between maps of different strides.

Coordinates are continuous pixels (the image spans [0, W] x [0, H]; pixel column i covers [i, i + 1)).
A feature grid places cell i at `offset + stride * i`:
- ResNet (torchvision padding): every stride-2 layer centres output i on input 2i, so cell i of a
  stride-s map is centred on pixel index s * i, i.e. at s * i + 0.5 (`Grid(s, 0.5)`), not at s * (i + 1/2).
- ViT patch tokens (DINOv2): patch i covers pixels [s * i, s * (i + 1)), centred at s * (i + 1/2)
  (`Grid(s, s / 2)`).
- The pixels themselves are `Grid(1, 0.5)`.
`resample` moves a map from one grid to another so that cell centres line up; `jax.image.resize` instead
assumes `Grid(s, s / 2)` on both sides, which puts a ResNet map half a cell minus half a pixel off.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

PIXELS_OFFSET = 0.5  # the centre of pixel 0


class Grid(NamedTuple):
  stride: float  # pixels between neighbouring cells
  offset: float  # pixel coordinate of cell 0's centre

  def centres(self, n: int):
    """Pixel coordinates of the centres of cells 0..n-1."""
    return self.offset + self.stride * jnp.arange(n, dtype=jnp.float32)

  def to_cells(self, points):
    """Pixel coordinates -> cell coordinates (cell i at i), elementwise."""
    return (points - self.offset) / self.stride

  def to_pixels(self, cells):
    return self.offset + self.stride * cells

  def coarser(self, factor: int) -> 'Grid':
    """The grid of a stride-`factor` convolution (padding kernel // 2) on this one: output i sits on input
    factor * i."""
    return Grid(self.stride * factor, self.offset)


def resnet(stride: int) -> Grid:
  return Grid(stride, PIXELS_OFFSET)


def patches(stride: int) -> Grid:
  return Grid(stride, stride / 2)


def resample(x, axes: Sequence[int], source: Grid, target: Grid, size: Sequence[int],
             method: str = 'linear'):
  """Resamples the `axes` of x from grid `source` to `size` cells of grid `target` (linear interpolation;
  antialiased, i.e. averaged, when the target is coarser). Cell centres line up exactly, so a map that is
  linear in pixel position stays the same linear map wherever it is interpolated."""
  scale = source.stride / target.stride  # target cells per source cell
  # scale_and_translate samples output cell j at input cell (j + 1/2 - t) / scale - 1/2; solving for the
  # input cell that holds target j's centre, (target.to_pixels(j) - source.offset) / source.stride, gives t.
  translation = 0.5 - 0.5 * scale - (target.offset - source.offset) / target.stride
  shape = list(x.shape)
  for axis, n in zip(axes, size):
    shape[axis] = n
  n_axes = len(axes)
  out = jax.image.scale_and_translate(
      x.astype(jnp.float32) if x.dtype == jnp.bool_ else x, shape, axes,
      jnp.full((n_axes,), scale, jnp.float32), jnp.full((n_axes,), translation, jnp.float32), method=method,
      antialias=scale < 1)
  return out.astype(x.dtype) if x.dtype != jnp.bool_ else out
