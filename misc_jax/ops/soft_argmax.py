"""From score volumes to coordinates: soft-argmax (CATs), Gaussian-kernel soft-argmax and keypoint
transfer (CHM), and flow to keypoints (CATs).

Cell positions: the references place a grid of n cells at linspace(-1, 1, n) in normalised coordinates
(image pixels normalise as (v - size/2) / (size/2), CHM's convention), the default here for parity. Our
models pass `positions`, the cells' true centres in pixels (ops/grid.py), and get pixels back. Keypoints
are [B, N, 2] (x, y) with a validity mask [B, N]; invalid entries are returned unchanged.
"""

import jax
import jax.numpy as jnp


def _grid(h, w, positions=None):
  """[h * w, 2] (x, y) of every cell of an h x w grid, row-major: `positions` (ys [h], xs [w]), or
  linspace(-1, 1) on both axes (the references')."""
  ys, xs = positions if positions is not None else (jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w))
  ys, xs = jnp.meshgrid(ys, xs, indexing='ij')
  return jnp.stack([xs.ravel(), ys.ravel()], -1)


def soft_argmax(corr, beta: float = 0.02, positions=None):
  """CATs' soft-argmax: for every target cell, the expected source position under a softmax with
  temperature `beta` over the source dims. corr [B, Ha, Wa, Hb, Wb] -> [B, Hb, Wb, 2] (x, y), in the units
  of `positions` (the source cells' (ys, xs); default: normalised, as CATs)."""
  b, ha, wa, hb, wb = corr.shape
  logits = corr.reshape(b, ha * wa, hb * wb) / beta  # [B, Sa, Sb]
  prob = jax.nn.softmax(logits, axis=1)
  coords = jnp.einsum('bst,sd->btd', prob, _grid(ha, wa, positions))  # [B, Sb, 2]
  return coords.reshape(b, hb, wb, 2)


def grid_to_flow(grid, source_hw):
  """Normalised source coordinates at every target cell -> flow in source cells (CATs'
  unnormalise_and_convert_mapping_to_flow). grid [B, Hb, Wb, 2] -> flow [B, Hb, Wb, 2] (dx, dy)."""
  ha, wa = source_hw
  hb, wb = grid.shape[1:3]
  x = (grid[..., 0] + 1) * (wa - 1) / 2 - jnp.arange(wb)[None, None, :]
  y = (grid[..., 1] + 1) * (ha - 1) / 2 - jnp.arange(hb)[None, :, None]
  return jnp.stack([x, y], -1)


def kernel_soft_argmax(corr, sigma: float = 17., positions=None):
  """CHM's Gaussian-kernel soft-argmax: for every source cell, the expected target position under a
  softmax (no temperature) of the scores times a Gaussian (sigma in cells) around their argmax.

  corr [B, Ha, Wa, Hb, Wb] -> [B, Ha, Wa, 2] target (x, y) in the units of `positions` (the target cells'
  (ys, xs); default: normalised, as CHM). The kernel multiplies the raw scores (as CHM does), so it
  suppresses far matches only where scores are positive.
  """
  b, ha, wa, hb, wb = corr.shape
  scores = corr.reshape(b, ha * wa, hb * wb)  # [B, Sa, Sb]
  gauss = jnp.exp(-_squared_distance_to_argmax(scores, wb) / (2 * sigma**2))
  prob = jax.nn.softmax(gauss * scores, axis=2)
  coords = jnp.einsum('bst,td->bsd', prob, _grid(hb, wb, positions))
  return coords.reshape(b, ha, wa, 2)


def local_soft_argmax(corr, beta: float, sigma: float, positions=None):
  """For every source cell, the expected target position under softmax(corr / beta) times a Gaussian
  (sigma in cells) around the argmax: the mass of one mode, where several instances each hold one. Unlike
  CHM's kernel (which multiplies the raw scores, so that it favours far cells wherever the scores are
  negative) it is unchanged by adding a constant to the scores, as the softmax and the training loss are.

  corr [B, Ha, Wa, Hb, Wb] -> [B, Ha, Wa, 2] target (x, y) in the units of `positions`.
  """
  b, ha, wa, hb, wb = corr.shape
  logits = corr.reshape(b, ha * wa, hb * wb) / beta  # [B, Sa, Sb]
  prob = jax.nn.softmax(logits - _squared_distance_to_argmax(logits, wb) / (2 * sigma**2), axis=2)
  coords = jnp.einsum('bst,td->bsd', prob, _grid(hb, wb, positions))
  return coords.reshape(b, ha, wa, 2)


def keypoint_argmax(rows, positions, beta: float = 0.02, window: float = 0.):
  """The nearest-neighbour read-out of the DINOv2 correspondence line (SD-DINO, GeoAware-SC): each
  keypoint's own score row over the target cells -> its best cell's centre, or with `window` > 0 the
  expected position under softmax(rows / beta) over the cells within `window` cells of the best one
  (GeoAware-SC's windowed soft-argmax). Unlike the whole-image soft-argmax it does not average two
  symmetric modes into a point between them.

  rows [B, N, Hb, Wb] -> [B, N, 2] (x, y) in the units of `positions` (the target cells' (ys, xs)).
  """
  b, n, hb, wb = rows.shape
  logits = rows.reshape(b, n, hb * wb) / beta
  centres = _grid(hb, wb, positions)  # [Hb * Wb, 2]
  if not window:
    return centres[jnp.argmax(logits, axis=-1)]
  near = _squared_distance_to_argmax(logits, wb) <= window**2
  prob = jax.nn.softmax(jnp.where(near, logits, -jnp.inf), axis=-1)
  return jnp.einsum('bnt,td->bnd', prob, centres)


def _squared_distance_to_argmax(scores, wb: int):
  """scores [B, Sa, Sb] over target cells in rows of wb -> [B, Sa, Sb] squared distances (in cells) of
  every target cell to the best-scoring one of its row."""
  best = jnp.argmax(scores, axis=2)  # [B, Sa]
  ty, tx = jnp.divmod(jnp.arange(scores.shape[2]), wb)
  return (tx - (best % wb)[..., None])**2 + (ty - (best // wb)[..., None])**2


def _half_size_xy(image_hw):
  return jnp.array([image_hw[1], image_hw[0]], jnp.float32) / 2


def normalize_keypoints(kps, image_hw):
  """Pixels -> [-1, 1] as CHM: (v - size/2) / (size/2), per axis; kps [..., 2] (x, y)."""
  half = _half_size_xy(image_hw)
  return (kps - half) / half


def unnormalize_keypoints(kps, image_hw):
  """The inverse of `normalize_keypoints`."""
  half = _half_size_xy(image_hw)
  return kps * half + half


def transfer_keypoints(target_coords, src_kps, valid, attn_thres: float = 0.1):
  """CHM's attentive keypoint indexing: a keypoint's prediction is the average of `target_coords` over
  the source cells within `attn_thres` of it, weighted by (attn_thres - distance).

  target_coords [B, Ha, Wa, 2] (from kernel_soft_argmax), src_kps [B, N, 2] normalised, valid [B, N]
  -> [B, N, 2] normalised target keypoints. Where no cell is within `attn_thres` (CHM divides 0 by 0),
  the nearest cell is used instead.
  """
  b, ha, wa, _ = target_coords.shape
  cells = _grid(ha, wa)  # [Sa, 2]
  dist = jnp.sqrt(jnp.sum((cells[None, None] - src_kps[:, :, None])**2, -1) + 1e-5)  # [B, N, Sa]
  weight = jnp.maximum(attn_thres - dist, 0)
  total = weight.sum(-1, keepdims=True)
  nearest = jax.nn.one_hot(jnp.argmin(dist, -1), ha * wa)
  weight = jnp.where(total > 0, weight / jnp.where(total > 0, total, 1), nearest)
  pred = jnp.einsum('bns,bsd->bnd', weight, target_coords.reshape(b, ha * wa, 2))
  return jnp.where(valid[..., None], pred, src_kps)


def interpolate_at_cells(values, cells, valid):
  """Bilinear interpolation of a per-cell map at points given in cell coordinates (cell i at i), linear
  extrapolation past the outer cells (so a map linear in position is reproduced exactly everywhere).

  values [B, H, W, D], cells [B, N, 2] (x, y), valid [B, N] -> [B, N, D] (0 where invalid).
  """
  b, h, w, _ = values.shape
  u = cells
  lo = jnp.clip(jnp.floor(u), 0, jnp.array([w - 2, h - 2])).astype(jnp.int32)
  lo = jnp.maximum(lo, 0)  # one-cell axes
  t = u - lo  # not clipped: extrapolates outside [0, n - 1]
  hi = jnp.minimum(lo + 1, jnp.array([w - 1, h - 1]))
  rows = jnp.arange(b)[:, None]
  at = lambda x, y: values[rows, y, x]  # [B, N, D]
  tx, ty = t[..., :1], t[..., 1:]
  top = at(lo[..., 0], lo[..., 1]) * (1 - tx) + at(hi[..., 0], lo[..., 1]) * tx
  bottom = at(lo[..., 0], hi[..., 1]) * (1 - tx) + at(hi[..., 0], hi[..., 1]) * tx
  return jnp.where(valid[..., None], top * (1 - ty) + bottom * ty, 0)


def flow_to_keypoints(flow, kps, valid, image_hw):
  """CATs' flow2kps: upsample a flow [B, h, w, 2] (feature cells) to the image, scale it to pixels and
  add it at each keypoint's pixel (coordinates truncated, then clamped to the image, as CATs does).

  kps [B, N, 2] pixels, valid [B, N] -> [B, N, 2] pixels; invalid entries are returned unchanged.
  """
  b, h, w, _ = flow.shape
  height, width = image_hw
  up = jax.image.resize(flow, (b, height, width, 2), 'linear')  # half-pixel, like align_corners=False
  up = up * jnp.array([width / w, height / h], flow.dtype)
  ix = jnp.clip(jnp.trunc(kps[..., 0]).astype(jnp.int32), 0, width - 1)
  iy = jnp.clip(jnp.trunc(kps[..., 1]).astype(jnp.int32), 0, height - 1)
  disp = up[jnp.arange(b)[:, None], iy, ix]  # [B, N, 2]
  est = jnp.stack([ix, iy], -1).astype(flow.dtype) + disp
  return jnp.where(valid[..., None], est, kps)
