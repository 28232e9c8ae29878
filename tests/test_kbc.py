"""KBC cropping: exact inverse maps, windows inside the image, degenerate boxes, a dot stays on its point."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np

from misc_jax import input_pipeline
from misc_jax import kbc
from misc_jax import train
from misc_jax.models import kbcnet
from misc_jax.models import supervision
from misc_jax.ops import grid as grids

SIZE = 64
PARAMS = dict(margin=0.1, fill=0.8, max_scale=4., small_threshold=0.5)


@jax.jit
def _crop(kps, valid):
  box = kbc.keypoint_box(kps, valid)
  return kbc.crop_for_box(box, valid.any(-1), SIZE, **PARAMS)


_keypoints = hnp.arrays(np.float32, (3, 5, 2), elements=st.floats(0, SIZE, width=32))
_valid = hnp.arrays(np.bool_, (3, 5))


@hypothesis.settings(deadline=None, max_examples=50)
@hypothesis.given(_keypoints, _valid)
def test_crop_then_uncrop_returns_the_keypoints(kps, valid):
  crop = _crop(kps, valid)
  np.testing.assert_allclose(kbc.from_crop(kbc.to_crop(kps, crop), crop), kps, atol=1e-4)


@hypothesis.settings(deadline=None, max_examples=50)
@hypothesis.given(_keypoints, _valid)
def test_window_lies_inside_the_image_and_keeps_the_keypoints(kps, valid):
  crop = _crop(kps, valid)
  assert np.all(np.isfinite(crop.scale)) and np.all(np.isfinite(crop.offset))
  assert np.all(crop.scale >= 1) and np.all(crop.scale <= PARAMS['max_scale'])
  corners = kbc.from_crop(jnp.array([[[0., 0.], [SIZE, SIZE]]] * 3), crop)  # the window, in the image
  assert np.all(corners >= -1e-4) and np.all(corners <= SIZE + 1e-4)
  inside = kbc.to_crop(kps, crop)
  assert np.all((inside[valid] >= -1e-3) & (inside[valid] <= SIZE + 1e-3))


def test_degenerate_boxes_give_valid_crops():
  kps = np.zeros((5, 3, 2), np.float32)
  valid = np.ones((5, 3), bool)
  kps[0] = [[10, 12], [0, 0], [0, 0]]
  valid[0, 1:] = False                          # one valid keypoint
  kps[1] = [[30, 30]] * 3                       # all identical
  kps[2] = [[-20, -20], [90, 90], [30, 30]]     # box larger than the image
  kps[3] = [[0, 0], [2, 1], [1, 3]]             # at the border
  valid[4] = False                              # none valid
  crop = _crop(kps, valid)
  np.testing.assert_allclose(crop.scale, [4, 4, 1, 4, 1])  # tiny boxes: the largest enlargement
  offset = np.asarray(crop.offset)
  np.testing.assert_allclose(offset[[2, 3, 4]], 0)  # 3: the window clamped into the image's corner
  np.testing.assert_allclose(kbc.to_crop(kps[1:2], jax.tree.map(lambda v: v[1:2], crop))[0, 0],
                             [SIZE / 2, SIZE / 2], atol=1e-4)  # the box centre is the crop centre


def test_small_threshold_and_fill():
  kps = np.array([[[20., 20.], [36., 24.]], [[0., 0.], [40., 10.]]], np.float32)  # sides 16 and 40
  crop = _crop(kps, np.ones((2, 2), bool))
  np.testing.assert_allclose(crop.scale, [0.8 * SIZE / (16 * 1.2), 1.])  # 40 >= 0.5 x 64: not small
  box = kbc.boxes_to_crop(kbc.keypoint_box(kps, np.ones((2, 2), bool)), crop)[0]
  np.testing.assert_allclose(max(box[2] - box[0], box[3] - box[1]) * 1.2, 0.8 * SIZE, rtol=1e-5)


def test_a_dot_stays_on_its_keypoint():
  """A synthetic image with a dot drawn at a keypoint: after the crop, the dot is at the mapped point."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
  for _ in range(5):
    kps = rng.uniform(8, SIZE - 8, (1, 3, 2)).astype(np.float32)
    kps[0, 1:] = kps[0, :1] + rng.uniform(-4, 4, (2, 2))  # a small object
    dot = kps[0, 0]
    image = np.exp(-((xx - dot[0])**2 + (yy - dot[1])**2) / 2.)[None, ..., None].astype(np.float32)
    crop = _crop(kps, np.ones((1, 3), bool))
    assert crop.scale[0] > 1.5
    out = np.asarray(kbc.resample(jnp.asarray(image), crop))[0, ..., 0]
    weights = out / out.sum()
    centroid = [(weights * xx).sum(), (weights * yy).sum()]  # of the dot, in crop pixels
    np.testing.assert_allclose(centroid, kbc.to_crop(kps, crop)[0, 0], atol=0.05)


def _identity_model():
  """config.kbc, and apply / transfer functions of a model whose scores map every cell onto itself."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.kbcnet_config('kbcnet_tiny', 'synthetic_misc/tiny', image_size=SIZE).kbc
  grid = SIZE // 8
  eye = jnp.eye(grid * grid).reshape(1, grid * grid, grid, grid)
  apply = lambda source, target: jnp.broadcast_to(eye, (source.shape[0],) + eye.shape[1:]) * 100.
  transfer = lambda scores, kps, valid: kbcnet.predict_keypoints(scores, kps, valid, SIZE,
                                                                 grid=grids.resnet(8), beta=1.)
  return config, apply, transfer


def test_test_time_kbc_with_an_identity_model_returns_the_keypoints():
  """Through an identity score volume, the crops' maps must cancel: the plumbing of kbc.predict."""
  config, apply, transfer = _identity_model()
  kps = np.array([[[20., 22.], [26., 25.], [23., 30.]]], np.float32)  # a small object
  valid = np.array([[True, True, False]])
  images = jnp.zeros((1, SIZE, SIZE, 3))
  assert _crop(kps, valid).scale[0] > 1.5
  pred = kbc.predict(apply, transfer, images, images, kps, valid, kps, config)
  np.testing.assert_allclose(pred[valid], kps[valid], atol=0.2)
  np.testing.assert_array_equal(pred[~valid], kps[~valid])


def test_passes_zoom_in_step_by_step_through_the_same_plumbing():
  """kbc.passes = 3: three crops enlarging max_scale ** (1/3), ** (2/3) and max_scale (the widths of the
  windows an x-ramp image shows), each around the previous pass's predictions; through the identity
  model the keypoints still map onto themselves."""
  config, apply, transfer = _identity_model()
  with config.unlocked():
    config.passes = 3
  kps = np.array([[[30., 28.], [36., 31.], [33., 36.]]], np.float32)  # small: every pass is capped
  valid = np.ones((1, 3), bool)
  ramp = jnp.broadcast_to(jnp.arange(SIZE, dtype=jnp.float32)[None, None, :, None], (1, SIZE, SIZE, 3))
  widths = []

  def recording(source, target):
    widths.append(float(source[0, SIZE // 2, -1, 0] - source[0, SIZE // 2, 0, 0]) + 1)
    return apply(source, target)

  pred = kbc.predict(recording, transfer, ramp, ramp, kps, valid, kps + 3., config)
  want = [SIZE / config.max_scale ** (i / 3) for i in (1, 2, 3)]
  np.testing.assert_allclose(widths, want, atol=1.)
  np.testing.assert_allclose(pred, kps + 3., atol=0.2)  # the identity keeps the coarse shift...
  config.passes = 1
  once = kbc.predict(apply, transfer, ramp, ramp, kps, valid, kps + 3., config)
  np.testing.assert_allclose(once, kps + 3., atol=0.2)  # ...as one pass does


def test_agreeing_keeps_the_points_near_their_median():
  points = jnp.array([[[10., 10.], [12., 11.], [11., 13.], [60., 60.], [11., 11.]]])
  valid = jnp.array([[True, True, True, True, False]])
  np.testing.assert_array_equal(kbc.agreeing(points, valid, jnp.array([5.])), [[1, 1, 1, 0, 0]])
  # None within the radius: every valid point, so the box stays the coarse pass's own.
  np.testing.assert_array_equal(kbc.agreeing(points, valid, jnp.array([0.1])), valid)


def test_a_stray_coarse_prediction_does_not_move_the_target_crop():
  """With kbc.coarse_radius, the target crop is framed by the coarse predictions that agree: a stray one
  (another instance) leaves it where the rest put it, so the identity model maps every keypoint back."""
  config, apply, transfer = _identity_model()
  kps = np.array([[[20., 22.], [26., 25.], [23., 30.], [23., 25.]]], np.float32)
  valid = np.ones((1, 4), bool)
  coarse = kps.copy()
  coarse[0, 3] = [55., 58.]  # the fourth keypoint's coarse match landed on another instance
  images = jnp.zeros((1, SIZE, SIZE, 3))
  errors = {}
  for radius in (0., 1.):
    with config.unlocked():
      config.coarse_radius = radius
    pred = kbc.predict(apply, transfer, images, images, kps, valid, coarse, config)
    errors[radius] = np.abs(np.asarray(pred) - kps).max()
  assert errors[1.] < 0.2  # the crop around the three that agree: the source's own
  assert errors[0.] > 2.  # the crop stretched to the stray: the maps no longer cancel


def test_only_the_small_side_is_enlarged_which_brings_the_scales_together():
  """Each image's crop is decided on its own box. A small source (side 8 of 64) and a large target (side
  34: not small) -> the source is enlarged, the target is left whole, and the objects' sizes become closer
  than if both were cropped (the rule kbc.py's docstring defines)."""
  config, apply, transfer = _identity_model()
  src = np.array([[[20., 20.], [28., 24.]]], np.float32)
  trg = np.array([[[12., 12.], [46., 30.]]], np.float32)
  valid = np.ones((1, 2), bool)
  ramp = jnp.broadcast_to(jnp.arange(SIZE, dtype=jnp.float32)[None, None, :, None], (1, SIZE, SIZE, 3))
  scales = []

  def recording(source, target):
    scales.extend(SIZE / (float(x[0, SIZE // 2, -1, 0] - x[0, SIZE // 2, 0, 0]) + 1)
                  for x in (source, target))
    return apply(source, target)

  kbc.predict(recording, transfer, ramp, ramp, src, valid, trg, config)
  src_scale, trg_scale = scales
  assert src_scale > 2 and abs(trg_scale - 1) < 0.05
  if_both = float(kbc.crop_for_box(kbc.keypoint_box(trg, valid), valid.any(-1), SIZE, **dict(
      PARAMS, small_threshold=1.01)).scale[0])  # what cropping the target too would enlarge it by
  assert if_both > 1.2
  sizes = lambda s, t: max(8 * s, 34 * t) / min(8 * s, 34 * t)
  assert sizes(src_scale, 1.) < sizes(src_scale, if_both)


def test_train_time_crops_move_the_pairs_they_pick(smoke_config):
  batch = next(input_pipeline.train_iterator(smoke_config))
  batch['source']['instance_valid'][:, 1:] = False  # one annotated instance: the one picked
  b = batch['valid'].shape[0]
  keys = jax.random.split(jax.random.key(0), b)
  with smoke_config.unlocked():
    smoke_config.kbc.train_prob = 0.5
  out = train._kbc_crops(batch, keys, smoke_config)  # pylint: disable=protected-access
  moved = np.array([not np.array_equal(out['source']['image'][i], batch['source']['image'][i])
                    for i in range(b)])
  assert 0 < moved.sum() < b  # some pairs cropped, some not
  still = ~moved
  np.testing.assert_array_equal(out['source']['keypoints'][still], batch['source']['keypoints'][still])
  src_crop = kbc.crop_for_config(batch['source']['keypoints'][:, 0],
                                 batch['source']['keypoint_valid'][:, 0], SIZE, smoke_config.kbc)
  i = int(np.argmax(moved))
  np.testing.assert_allclose(out['source']['keypoints'][i, 0],
                             kbc.to_crop(batch['source']['keypoints'][i:i + 1, 0],
                                         jax.tree.map(lambda v: v[i:i + 1], src_crop))[0], atol=1e-4)


def test_train_time_target_crop_frames_one_target_instance(smoke_config):
  """As at test time (the instance the coarse predictions agree on), a training pair's target crop frames
  the keypoints of one of its target instances, not the box of all of them."""
  batch = next(input_pipeline.train_iterator(smoke_config))
  batch['source']['instance_valid'][:, 1:] = False  # source instance 0 is the one picked
  b = batch['valid'].shape[0]
  with smoke_config.unlocked():
    smoke_config.kbc.train_prob = 1.
  keys = jax.random.split(jax.random.key(0), b)
  out = train._kbc_crops(batch, keys, smoke_config)  # pylint: disable=protected-access
  _, _, kps, valid, _ = supervision.instance_targets(batch)  # the matches of instance 0's keypoints
  crop_of = lambda points, mask: kbc.crop_for_config(points, mask, SIZE, smoke_config.kbc)
  seen_through = lambda crop: np.asarray(kbc.to_crop(kps, crop))
  several = 0
  for i in range(b):
    got = out['target']['keypoints'][i][valid[i]]
    per_instance = [seen_through(crop_of(kps[:, j], valid[:, j]))[i][valid[i]]
                    for j in range(kps.shape[1]) if valid[i, j].any()]
    assert any(np.allclose(got, want, atol=1e-4) for want in per_instance), i
    all_of_them = seen_through(crop_of(kps.reshape(b, -1, 2), valid.reshape(b, -1)))[i][valid[i]]
    several += len(per_instance) > 1 and not np.allclose(got, all_of_them, atol=1e-4)
  assert several  # pairs with several target instances exist, and their crop is not the box of all


def test_training_crops_are_cut_from_the_full_resolution_view(smoke_config):
  """With kbc.train_prob the training batches carry `image_full`, augmented with the image's own draws (at
  the image's size the two are the same picture), and the training crops are cut from it, as KBC's
  evaluation crops are (crops of the small image are blurrier than the ones the second pass is tested on)."""
  with smoke_config.unlocked():
    smoke_config.kbc.train_prob = 1.
  batch = next(input_pipeline.train_iterator(smoke_config))
  image, full = batch['source']['image'], batch['source']['image_full']
  assert full.shape[1] == round(smoke_config.kbc.max_scale * SIZE)
  down = np.asarray(jax.image.resize(full.astype(np.float32), image.shape, 'linear', antialias=True))
  assert np.abs(down - image).mean() < 3  # the photometric jitter alone moves pixels by up to 25
  assert np.abs(down - image[::-1]).mean() > 10
  batch['source']['instance_valid'][:, 1:] = False  # the source crop frames instance 0
  keys = jax.random.split(jax.random.key(0), image.shape[0])
  out = train._kbc_crops(batch, keys, smoke_config)  # pylint: disable=protected-access
  assert 'image_full' not in out['source']
  src_kps, src_valid, *_ = supervision.instance_targets(batch)
  want = kbc.resample(full, kbc.crop_for_config(src_kps, src_valid, SIZE, smoke_config.kbc), SIZE)
  np.testing.assert_allclose(out['source']['image'], want, atol=1)


def test_crops_mask_the_keypoints_they_cut_off():
  """A training crop around instance 0 leaves instance 1's far keypoints outside the window: no longer
  valid, on either side (the loss must not chase points it cannot see)."""
  kps = np.array([[[[20., 22.], [26., 25.]], [[2., 60.], [30., 30.]]]], np.float32)  # [1, I=2, K=2, 2]
  side = {'image': jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), 'keypoints': kps,
          'keypoint_valid': np.ones((1, 2, 2), bool), 'bboxes': np.zeros((1, 2, 4), np.float32),
          'masks': np.zeros((1, 2, SIZE, SIZE), bool)}
  crop = _crop(kps[:, 0], np.ones((1, 2), bool))
  assert crop.scale[0] > 1.5
  out = kbc.crop_side(side, crop)
  np.testing.assert_array_equal(out['keypoint_valid'][0], [[True, True], [False, True]])
  np.testing.assert_allclose(out['keypoints'], kbc.to_crop(kps, crop), atol=1e-5)


def test_crops_cut_from_the_full_resolution_image_keep_its_detail():
  """The same window from a 4x larger copy of the view: the geometry is the crop's (a smooth image gives
  the same pixels) and the detail is the large copy's (a checkerboard of 4 px squares, averaged away at
  SIZE px, survives)."""
  crop = kbc.Crop(jnp.array([3.]), jnp.array([[40., 70.]]))
  yy, xx = np.mgrid[0:4 * SIZE, 0:4 * SIZE] + 0.5
  smooth = (128 + 100 * np.sin(xx / 40) * np.cos(yy / 53))[None, ..., None].astype(np.float32)
  small = jax.image.resize(smooth, (1, SIZE, SIZE, 1), 'linear', antialias=True)
  np.testing.assert_allclose(kbc.resample(jnp.asarray(smooth), crop, SIZE), kbc.resample(small, crop),
                             atol=1.5)
  checker = ((np.floor(xx / 4) + np.floor(yy / 4)) % 2 * 255)[None, ..., None].astype(np.float32)
  checker_small = jax.image.resize(checker, (1, SIZE, SIZE, 1), 'linear', antialias=True)
  assert float(kbc.resample(checker_small, crop).std()) < 20
  assert float(kbc.resample(jnp.asarray(checker), crop, SIZE).std()) > 50
