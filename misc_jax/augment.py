"""Training augmentations of one image side (TensorFlow, inside the tf.data pipeline; stateless seeds).

- `box_crop`: CATs' random crop that keeps the objects: each edge of the window is drawn uniformly between
  the image border and the box around every annotated instance (CATs' `random_crop`, p = 0.5 in its SPair
  recipe), so the object is kept whole and its scale and position vary.
- `photometric`: brightness, contrast and saturation jitter (the synthetic demo's).
- `cats_colour`: CATs' albumentations list, each applied with probability p (0.2 in CATs): ToGray,
  Posterize (4 bits), Equalize (per channel), Sharpen (alpha 0.2-0.5, lightness 0.5-1), brightness and
  contrast (+-0.2), Solarize (threshold 128), ColorJitter (brightness, contrast, saturation, hue +-0.2), in
  that order, with albumentations' defaults.
"""

import tensorflow as tf


def _uniform(seed, low=0., high=1.):
  return tf.random.stateless_uniform([], seed, low, high)


def box_crop(side, seed, prob: float):
  """With probability `prob`, crops a decoded side (image [H, W, 3], masks [I, H, W, 1], keypoints, boxes)
  to a window that contains the box of all its instances."""
  seeds = tf.random.experimental.stateless_split(seed, 5)
  image = side['image']
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  box = tf.concat([tf.reduce_min(side['bboxes'][:, :2], 0), tf.reduce_max(side['bboxes'][:, 2:], 0)], 0)
  box = tf.clip_by_value(box, 0., tf.concat([hw[::-1], hw[::-1]], 0))  # (x1, y1, x2, y2)
  left = tf.floor(_uniform(seeds[0]) * (box[0] + 1))
  top = tf.floor(_uniform(seeds[1]) * (box[1] + 1))
  right = tf.math.ceil(box[2] + _uniform(seeds[2]) * (hw[1] - box[2]))
  bottom = tf.math.ceil(box[3] + _uniform(seeds[3]) * (hw[0] - box[3]))
  apply = _uniform(seeds[4]) < prob
  left, top = tf.where(apply, left, 0.), tf.where(apply, top, 0.)
  right, bottom = tf.where(apply, right, hw[1]), tf.where(apply, bottom, hw[0])
  window = tf.cast(tf.stack([top, left, bottom - top, right - left]), tf.int32)
  offset = tf.stack([left, top])
  crop = lambda x: x[..., window[0]:window[0] + window[2], window[1]:window[1] + window[3], :]
  shift = lambda points, valid: tf.where(valid[..., None], points - offset, 0.)
  out = dict(side, image=crop(image), masks=crop(side['masks']),
             keypoints=shift(side['keypoints'], side['keypoint_visible']),
             bboxes=side['bboxes'] - tf.tile(offset, [2]))
  if 'dense_points' in side:
    out['dense_points'] = shift(side['dense_points'], side['dense_visible'])
  return out


def photometric(image, seed, aug):
  """Brightness, contrast and saturation jitter of a float [S, S, 3] image in [0, 255]."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  image = image / 255.
  image = tf.image.stateless_random_brightness(image, aug.brightness, seeds[0])
  image = tf.image.stateless_random_contrast(image, 1 - aug.contrast, 1 + aug.contrast, seeds[1])
  image = tf.image.stateless_random_saturation(image, 1 - aug.saturation, 1 + aug.saturation, seeds[2])
  return tf.clip_by_value(image, 0., 1.) * 255.


def _equalize(image):
  """OpenCV's equalizeHist on each channel of a [H, W, 3] image in [0, 255] (rounded to integers)."""
  def channel(x):
    x = tf.cast(tf.round(x), tf.int32)
    hist = tf.math.bincount(tf.reshape(x, [-1]), minlength=256, maxlength=256)
    cdf = tf.cast(tf.cumsum(hist), tf.float32)
    first = tf.reduce_min(tf.where(hist > 0, cdf, tf.float32.max))
    total = tf.cast(tf.size(x), tf.float32)
    lut = tf.round(tf.clip_by_value((cdf - first) * 255. / tf.maximum(total - first, 1.), 0., 255.))
    return tf.where(total > first, tf.gather(lut, x), tf.cast(x, tf.float32))
  return tf.stack([channel(image[..., c]) for c in range(3)], -1)


def _sharpen(image, seed):
  seeds = tf.random.experimental.stateless_split(seed, 2)
  alpha, lightness = _uniform(seeds[0], 0.2, 0.5), _uniform(seeds[1], 0.5, 1.)
  identity = tf.constant([[0., 0., 0.], [0., 1., 0.], [0., 0., 0.]])
  edges = tf.constant([[-1., -1., -1.], [-1., 8., -1.], [-1., -1., -1.]]) + lightness * identity
  kernel = (1 - alpha) * identity + alpha * edges
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'SAME')[0]
  return tf.clip_by_value(out, 0., 255.)


def _colour_jitter(image, seed):
  seeds = tf.random.experimental.stateless_split(seed, 4)
  x = image / 255.
  x = x * _uniform(seeds[0], 0.8, 1.2)
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(x))
  x = (x - mean) * _uniform(seeds[1], 0.8, 1.2) + mean
  x = tf.image.stateless_random_saturation(tf.clip_by_value(x, 0., 1.), 0.8, 1.2, seeds[2])
  x = tf.image.adjust_hue(x, _uniform(seeds[3], -0.2, 0.2))
  return tf.clip_by_value(x, 0., 1.) * 255.


def cats_colour(image, seed, prob: float):
  """CATs' colour augmentations of a float [S, S, 3] image in [0, 255], each with probability `prob`."""
  seeds = tf.random.experimental.stateless_split(seed, 16)
  grey = lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3])
  posterize = lambda x: tf.floor(x / 16.) * 16.  # keep 4 bits
  brightness_contrast = lambda x, s: tf.clip_by_value(
      x * _uniform(s, 0.8, 1.2) + 255. * _uniform(tf.random.experimental.stateless_fold_in(s, 1), -0.2, 0.2),
      0., 255.)
  solarize = lambda x: tf.where(x >= 128., 255. - x, x)
  steps = [lambda x, s: grey(x), lambda x, s: posterize(x), lambda x, s: _equalize(x), _sharpen,
           brightness_contrast, lambda x, s: solarize(x), _colour_jitter]
  for i, step in enumerate(steps):
    apply = _uniform(seeds[2 * i]) < prob
    image = tf.cond(apply, lambda: step(image, seeds[2 * i + 1]), lambda: image)
  return image


def stateless_seed(config_seed: int, index, side: int):
  """The seed of one side ('source' 0, 'target' 1) of training example `index`."""
  return tf.stack([tf.cast(config_seed, tf.int64), tf.cast(index, tf.int64) * 2 + side])

