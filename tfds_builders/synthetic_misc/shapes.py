"""Procedural object categories and the renderer of the synthetic multi-instance dataset.

Each category is a parametric shape family in a canonical frame ([-1, 1]^2, y down) with a fixed list of
semantically defined keypoints (keypoint k is the same part in every instance). An instance draws its own
shape parameters, a similarity-plus-aspect pose, and an object-frame texture (a colour gradient along the
object's axis and stripes across it), so appearance varies within a category but parts stay identifiable.
"""

import dataclasses
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclasses.dataclass(frozen=True)
class Shape:
  body: list[np.ndarray]     # polygons [V, 2] in the canonical frame; their union is the object
  details: list[np.ndarray]  # polygons painted on top of the body in a contrasting colour
  keypoints: np.ndarray      # [K, 2] canonical coordinates


def _arrow(rng):
  hx, hw, sw = rng.uniform(-0.1, 0.4), rng.uniform(0.5, 0.9), rng.uniform(0.15, 0.35)
  body = np.array([(1, 0), (hx, -hw), (hx, -sw), (-1, -sw), (-1, sw), (hx, sw), (hx, hw)], float)
  return Shape([body], [], body.copy())


def _star(rng):
  inner = rng.uniform(0.35, 0.55)
  angles = np.deg2rad(-90 + 36 * np.arange(10))
  radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
  body = np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
  dot = _ellipse((0, 0), (0.18, 0.18), 12)
  return Shape([body], [dot], np.concatenate([body, [[0, 0]]]))


def _house(rng):
  w, t, ax = rng.uniform(0.55, 0.9), rng.uniform(-0.3, 0.2), rng.uniform(-0.3, 0.3)
  dw, dh = rng.uniform(0.12, 0.25), rng.uniform(0.3, 0.6)
  wx, wy = rng.uniform(-w + 0.25, -0.1), (t + 1 - dh) / 2 + 0.1
  body = np.array([(-w, 1), (w, 1), (w, t), (ax, -1), (-w, t)], float)
  door = np.array([(-dw, 1), (dw, 1), (dw, 1 - dh), (-dw, 1 - dh)], float) + [w / 3, 0]
  window = _ellipse((wx, wy), (0.12, 0.12), 4)
  keypoints = np.concatenate([body, door[2:], [[wx, wy]]])
  return Shape([body], [door, window], keypoints)


def _cross(rng):
  a = rng.uniform(0.2, 0.4)
  up, right, down, left = rng.uniform(0.7, 1.0, size=4)
  body = np.array([(-a, -up), (a, -up), (a, -a), (right, -a), (right, a), (a, a), (a, down),
                   (-a, down), (-a, a), (-left, a), (-left, -a), (-a, -a)], float)
  return Shape([body], [], body.copy())


def _fish(rng):
  bh, th = rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.8)
  body = _ellipse((0.25, 0), (0.75, bh), 24)
  tail = np.array([(-0.4, 0), (-1, -th), (-0.85, 0), (-1, th)], float)
  eye = (0.6, -0.3 * bh)
  keypoints = np.array([(1, 0), (0.25, -bh), (0.25, bh), (-0.5, 0), (-1, -th), (-1, th), eye], float)
  return Shape([body, tail], [_ellipse(eye, (0.09, 0.09), 10)], keypoints)


def _ellipse(centre, radii, n):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([centre[0] + radii[0] * np.cos(t), centre[1] + radii[1] * np.sin(t)], -1)


CATEGORIES: dict[str, Callable[[np.random.Generator], Shape]] = {
    'arrow': _arrow, 'star': _star, 'house': _house, 'cross': _cross, 'fish': _fish}
NUM_KEYPOINTS = 12  # the most keypoints of any category; the rest are padding (invisible)

# Each category's outline: keypoint indices in order around the object. Dense training points are fixed
# affine combinations of the keypoints, so in every instance (whatever its shape parameters and pose) a
# dense point names the same part: a quarter, half and three quarters along each outline edge, each
# outline keypoint halfway to the outline's centroid, and the centroid.
OUTLINES = {'arrow': tuple(range(7)), 'star': tuple(range(10)), 'house': tuple(range(5)),
            'cross': tuple(range(12)), 'fish': (0, 1, 4, 3, 5, 2)}
NUM_DENSE_POINTS = 4 * max(len(o) for o in OUTLINES.values()) + 1  # the most of any category (49)


def dense_weights(category: str) -> np.ndarray:
  """[NUM_DENSE_POINTS, NUM_KEYPOINTS]: row p holds the weights (summing to 1, or all 0 for padding) of
  dense point p as a combination of the category's keypoints."""
  outline = list(OUTLINES[category])
  centroid = np.zeros(NUM_KEYPOINTS)
  centroid[outline] = 1 / len(outline)
  rows = []
  for a, b in zip(outline, outline[1:] + outline[:1]):
    for t in (0.25, 0.5, 0.75):
      w = np.zeros(NUM_KEYPOINTS)
      w[a], w[b] = 1 - t, t
      rows.append(w)
  for a in outline:
    w = 0.5 * centroid
    w[a] += 0.5
    rows.append(w)
  rows.append(centroid)
  out = np.zeros((NUM_DENSE_POINTS, NUM_KEYPOINTS))
  out[:len(rows)] = rows
  return out


@dataclasses.dataclass
class Instance:
  category: str
  keypoints: np.ndarray  # [K, 2] image pixels (continuous coordinates)
  mask: np.ndarray       # [H, W] bool, the full (amodal) silhouette

  @property
  def dense_points(self) -> np.ndarray:
    """[NUM_DENSE_POINTS, 2] image pixels (padding rows at 0)."""
    kps = np.zeros((NUM_KEYPOINTS, 2))
    kps[:len(self.keypoints)] = self.keypoints
    return dense_weights(self.category) @ kps


def _pose(rng, size, extent):
  """Returns the canonical -> pixel affine (A [2, 2], t [2]) of one instance."""
  half = 0.5 * extent * size
  aspect = np.exp(rng.uniform(-0.25, 0.25))
  theta = rng.uniform(-np.pi / 4, np.pi / 4)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  matrix = rot @ np.diag([half * aspect, half / aspect])
  centre = rng.uniform(0.05 * size, 0.95 * size, size=2)
  return matrix, centre


def _rasterise(polygons, size):
  """Polygon union -> [H, W] bool mask, testing pixel centres (see features.py conventions)."""
  canvas = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  for poly in polygons:
    draw.polygon([tuple(p) for p in (poly - 0.5)], fill=1)  # PIL fills integer positions
  return np.asarray(canvas, bool)


def _texture(rng, inv_matrix, centre, window):
  """[h, w, 3] float32 colours of an object-frame texture inside `window` (a pair of row/col slices)."""
  c0, c1 = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
  freq, phase = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
  ys, xs = np.mgrid[window].astype(np.float32) + 0.5
  u, v = np.einsum('ij,jhw->ihw', inv_matrix.astype(np.float32),
                   np.stack([xs - centre[0], ys - centre[1]]))
  t = np.clip((u + 1) / 2, 0, 1)[..., None]
  stripes = 1 - 0.3 * (np.sin(freq * v + phase) > 0)[..., None]
  return (c0 * (1 - t) + c1 * t) * stripes


def _background(rng, size, clutter):
  """A cluttered background: a colour gradient, random rectangles, ellipses and lines, blurred a little."""
  c0, c1 = rng.uniform(0, 255, size=(2, 3))
  t = np.linspace(0, 1, size)[:, None, None]
  base = (c0 * (1 - t) + c1 * t) * np.ones((1, size, 1))
  image = Image.fromarray(base.astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(clutter):
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    x0, y0 = rng.uniform(-0.1, 1.0, size=2) * size
    w, h = rng.uniform(0.03, 0.3, size=2) * size
    kind = rng.integers(3)
    if kind == 0:
      draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    elif kind == 1:
      draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    else:
      draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(1, 4)))
  return np.asarray(image.filter(ImageFilter.BoxBlur(1)), np.float32) / 255


def render_instance(rng, category, size, extent):
  """Samples one instance of `category` whose extent is about `extent` of the image side.

  Returns the instance and its colours inside `window`, the bounding slices of its silhouette.
  """
  shape = CATEGORIES[category](rng)
  matrix, centre = _pose(rng, size, extent)
  to_pixels = lambda p: p @ matrix.T + centre
  body = _rasterise([to_pixels(p) for p in shape.body], size)
  details = _rasterise([to_pixels(p) for p in shape.details], size)
  rows, cols = np.nonzero(body.any(1))[0], np.nonzero(body.any(0))[0]
  if not len(rows):  # Entirely outside the frame.
    rows = cols = np.zeros(1, int)
  window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
  colours = _texture(rng, np.linalg.inv(matrix), centre, window)
  detail_colour = 1 - colours.mean((0, 1))  # contrasting, so details are visible parts
  colours = np.where(details[window][..., None], detail_colour, colours)
  return Instance(category, to_pixels(shape.keypoints), body), window, colours


def photometric(rng, image):
  """Per-image brightness, contrast, colour gain, gamma and noise, so the two images of a pair differ."""
  gain = (rng.uniform(0.8, 1.2, size=3) * rng.uniform(0.75, 1.25)).astype(np.float32)
  mean = image.mean()
  image = (image - mean) * np.float32(rng.uniform(0.7, 1.3)) + mean
  image = np.clip(image * gain, 0, 1) ** np.float32(rng.uniform(0.8, 1.25))
  image = image + np.float32(rng.uniform(0, 0.03)) * rng.standard_normal(image.shape, np.float32)
  return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_image(rng, category, num_instances, *, size, extent_range, max_distractors, clutter,
                 min_visible_keypoints=2, min_visible_pixels=12, max_tries=100):
  """Renders an image with `num_instances` instances of `category` plus distractors of other categories.

  Returns (image uint8 [H, W, 3], side dict in the features.py schema, with masks as [I, H, W] bool).
  Resamples the layout until every annotated instance keeps at least `min_visible_keypoints` keypoints and
  `min_visible_pixels` visible pixels; each try draws from `rng`, so the result stays deterministic.
  """
  others = [c for c in CATEGORIES if c != category]
  for _ in range(max_tries):
    num_distractors = int(rng.integers(0, max_distractors + 1))
    cats = [category] * num_instances + list(rng.choice(others, size=num_distractors))
    order = rng.permutation(len(cats))  # drawing order; later objects occlude earlier ones
    image = _background(rng, size, clutter)
    owner = np.full((size, size), -1)
    drawn = []
    for depth, idx in enumerate(order):
      extent = np.exp(rng.uniform(*np.log(extent_range)))
      inst, window, colours = render_instance(rng, cats[idx], size, extent)
      image[window] = np.where(inst.mask[window][..., None], colours, image[window])
      owner[inst.mask] = depth
      drawn.append((idx, depth, inst))
    side = _annotate([(d, inst) for idx, d, inst in drawn if idx < num_instances], owner, size)
    if side is not None and all(
        v.sum() >= min_visible_keypoints for v in side['keypoint_visible']) and all(
            m.sum() >= min_visible_pixels for m in side['masks']):
      return photometric(rng, image), side
  raise RuntimeError(f'could not place {num_instances} visible {category} instances')


def _visible_points(points, depth, owner, body, size):
  """Which points [N, 2] are seen: inside the image, on (within a pixel of) the instance's body, and not
  covered by an object drawn later."""
  inside = ((points >= 0) & (points < size)).all(-1)
  ix, iy = np.clip(points.astype(int), 0, size - 1).T
  near = np.zeros_like(body)
  for dy, dx in np.ndindex(3, 3):  # the body dilated by one pixel: points on its outline count
    near |= np.roll(body, (dy - 1, dx - 1), axis=(0, 1))
  return inside & near[iy, ix] & (owner[iy, ix] <= depth)


def _annotate(instances, owner, size):
  """Visible masks, bboxes, keypoint and dense-point visibility of the annotated instances, in instance-id
  order."""
  keypoints, visible, masks, bboxes, dense, dense_visible = [], [], [], [], [], []
  for depth, inst in sorted(instances, key=lambda x: x[0]):
    mask = owner == depth
    if not mask.any():
      return None
    rows, cols = np.nonzero(mask)
    k = len(inst.keypoints)
    kps = np.full((NUM_KEYPOINTS, 2), -1, np.float32)
    kps[:k] = inst.keypoints
    vis = np.zeros(NUM_KEYPOINTS, bool)
    inside = ((kps[:k] >= 0) & (kps[:k] < size)).all(-1)
    ix, iy = np.clip(kps[:k].astype(int), 0, size - 1).T
    # A keypoint is occluded when an object drawn later covers its pixel (owner is the topmost depth).
    vis[:k] = inside & (owner[iy, ix] <= depth)
    kps[~vis] = -1
    keypoints.append(kps)
    visible.append(vis)
    masks.append(mask)
    bboxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    points = inst.dense_points.astype(np.float32)
    seen = _visible_points(points, depth, owner, inst.mask, size) & dense_weights(inst.category).any(-1)
    points[~seen] = -1
    dense.append(points)
    dense_visible.append(seen)
  return {
      'instance_ids': np.arange(len(instances), dtype=np.int64),
      'keypoints': np.stack(keypoints),
      'keypoint_visible': np.stack(visible),
      'bboxes': np.asarray(bboxes, np.float32),
      'masks': np.stack(masks),
      'dense_points': np.stack(dense),
      'dense_visible': np.stack(dense_visible),
  }
