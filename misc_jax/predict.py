r"""Transfers keypoints from a source image to a target image with a trained run.

  python -m misc_jax.predict --workdir runs/demo --source a.jpg --target b.jpg --keypoints kps.json \
      --output out.json                         # kps.json: [[x, y], ...] in source pixels
  misc-jax-predict --workdir runs/demo --source a.jpg --target b.jpg --bbox 10,20,90,120 --grid 4 \
      --output out.json                         # a 4 x 4 grid of keypoints inside the box
  misc-jax-predict --workdir runs/demo --pairs pairs.csv --output_dir predictions/

Writes the predicted target keypoints (JSON, target image pixels, always inside the image) and a PNG of the
matches next to it. Coordinates refer to each image as displayed: EXIF orientation applied (a phone's
portrait photo is upright), x to the right and y down from the top-left corner of the top-left pixel;
16-bit images are scaled to 8 bits. Every input is read and checked before the model loads.
Batch mode reads a CSV with the columns source, target and keypoints (a JSON file) or bbox
("x1,y1,x2,y2"); paths are relative to the CSV. Images are resized to the run's input size as in
training. `--kbc` (default on) adds KBC's second pass on crops around the keypoints, for small objects.
"""

import csv
import dataclasses
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import matplotlib
import numpy as np
from PIL import Image
from PIL import ImageOps

from misc_jax import cli
from misc_jax import kbc
from misc_jax import rundir
from misc_jax import sharding
from misc_jax import state as state_lib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top



_KEYPOINT_BLOCK = 32  # keypoint lists are padded to a multiple of this


@dataclasses.dataclass
class Pair:
  """Two images resized to the network input (and to `full` px, which KBC's crops are cut from), their
  original sizes (H, W), and source keypoints [N, 2] in source pixels: a validated prediction request."""
  source: np.ndarray
  target: np.ndarray
  source_full: np.ndarray
  target_full: np.ndarray
  source_hw: tuple[int, int]
  target_hw: tuple[int, int]
  keypoints: np.ndarray


def read_pair(source_path: str, target_path: str, keypoints, size: int, full: int) -> Pair:
  """Reads and checks one request (images decodable, keypoints inside the source image)."""
  (source, src_full), src_hw = load_image(source_path, (size, full))
  (target, trg_full), trg_hw = load_image(target_path, (size, full))
  keypoints = np.asarray(keypoints, np.float32).reshape(-1, 2)
  check_keypoints(keypoints, src_hw, source_path)
  return Pair(source, target, src_full, trg_full, src_hw, trg_hw, keypoints)


@dataclasses.dataclass
class Predictor:
  """A run's model, ready to transfer keypoints between two images of any size."""
  config: object
  model_module: object
  state: object
  step: int

  @classmethod
  def load(cls, workdir: str, checkpoint: str = 'latest') -> 'Predictor':
    return cls(*state_lib.load_run(workdir, checkpoint, mesh=sharding.one_device_mesh()))

  def __post_init__(self):
    self._transfer = jax.jit(self._transfer_fn, static_argnames='use_kbc')

  def _transfer_fn(self, source, target, full, kps, valid, use_kbc):
    variables = {'params': self.state.params, 'batch_stats': self.state.batch_stats}
    apply_fn = lambda s, t: self.state.apply_fn(variables, s, t)  # scores, or a dict holding them
    size = self.config.input.image_size
    transfer = lambda scores, k, v: self.model_module.predict_keypoints(
        scores, k, v, size, **self.model_module.transfer_kwargs(self.config.model))
    pred = transfer(apply_fn(source, target), kps, valid)
    if use_kbc:
      pred = kbc.predict(apply_fn, transfer, source, target, kps, valid, pred, self.config.kbc, full)
    return pred

  def __call__(self, source_path: str, target_path: str, keypoints, use_kbc: bool = True) -> np.ndarray:
    """Source keypoints [N, 2] (source pixels) -> target keypoints [N, 2] (target pixels)."""
    return self.transfer(read_pair(source_path, target_path, keypoints, self.config.input.image_size,
                                   full_size(self.config)), use_kbc)

  def transfer(self, pair: Pair, use_kbc: bool = True) -> np.ndarray:
    """The target keypoints [N, 2] of a read pair, in target pixels, inside the target image."""
    size = self.config.input.image_size
    to_input = lambda hw: np.array([size / hw[1], size / hw[0]], np.float32)  # (sx, sy)
    n = len(pair.keypoints)
    padded = -(-n // _KEYPOINT_BLOCK) * _KEYPOINT_BLOCK  # a few shapes, so few compilations
    kps = np.zeros((1, padded, 2), np.float32)
    kps[0, :n] = pair.keypoints * to_input(pair.source_hw)
    full = (pair.source_full[None], pair.target_full[None])
    pred = self._transfer(pair.source[None], pair.target[None], full, kps, np.arange(padded)[None] < n,
                          use_kbc=use_kbc)
    pred = np.asarray(pred[0, :n]) / to_input(pair.target_hw)
    return np.clip(pred, 0, [pair.target_hw[1], pair.target_hw[0]])


def full_size(config) -> int:
  """The side of the images KBC's crops are cut from: the input enlarged by kbc.max_scale."""
  return round(config.kbc.max_scale * config.input.image_size)


def read_image(path: str) -> np.ndarray:
  """An image file as displayed -> uint8 RGB [H, W, 3]. Coordinates everywhere refer to this frame: EXIF
  orientation applied (a phone's portrait photo is upright), x to the right and y down from the top-left
  corner of the top-left pixel. 16-bit images are scaled to 8 bits (not clipped)."""
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      if image.mode.startswith('I'):  # 16-bit ('I;16...') or 32-bit integer grey
        grey = np.asarray(image, np.float64)
        grey = grey / 257 if image.mode.startswith('I;16') or grey.max() > 255 else grey
        return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, -1)
      return np.asarray(image.convert('RGB'), np.uint8)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: no such image') from e
  except OSError as e:
    raise ValueError(f'{path}: cannot decode the image ({e})') from e


def load_image(path: str, sizes) -> tuple[np.ndarray | list[np.ndarray], tuple[int, int]]:
  """An image file -> (uint8 [size, size, 3] resized as in training, for a size or each of a list of sizes;
  its (H, W) as displayed)."""
  pixels = read_image(path)
  resize = lambda size: np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), np.uint8)
  return (resize(sizes) if isinstance(sizes, int) else [resize(size) for size in sizes]), pixels.shape[:2]


def check_keypoints(keypoints: np.ndarray, hw: tuple[int, int], path: str) -> None:
  if len(keypoints) == 0:
    raise ValueError(f'no source keypoints given for {path}')
  inside = ((keypoints >= 0) & (keypoints <= np.array([hw[1], hw[0]]))).all(1) & np.isfinite(
      keypoints).all(1)
  if not inside.all():
    k = int(np.flatnonzero(~inside)[0])
    raise ValueError(f'source keypoint {k} {keypoints[k].tolist()} lies outside {path} '
                     f'({hw[1]} x {hw[0]} pixels)')


def read_keypoints(path: str) -> np.ndarray:
  """[[x, y], ...] or {"keypoints": [[x, y], ...]} -> [N, 2]."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: cannot read the keypoints ({e})') from e
  if isinstance(data, dict):
    if 'keypoints' not in data:
      raise ValueError(f'{path}: expected [[x, y], ...] or {{"keypoints": [[x, y], ...]}}; the object has '
                       f'the keys {sorted(data)}')
    data = data['keypoints']
  try:
    if _has_bool(data):  # JSON true/false would read as 1/0
      raise TypeError('booleans are not coordinates')
    kps = np.asarray(data, np.float64)
  except (ValueError, TypeError):
    raise ValueError(f'{path}: keypoints must be numbers, [[x, y], ...]; got '
                     f'{json.dumps(data)[:80]}') from None
  if kps.ndim != 2 or kps.shape[1] != 2:
    raise ValueError(f'{path}: expected [[x, y], ...], got an array of shape {kps.shape}')
  return kps.astype(np.float32)


def _has_bool(data) -> bool:
  if isinstance(data, list):
    return any(map(_has_bool, data))
  return isinstance(data, bool)


def grid_in_box(box, n: int) -> np.ndarray:
  """n x n keypoints evenly inside box (x1, y1, x2, y2) (cell centres) -> [n * n, 2]."""
  if len(box) != 4:
    raise ValueError(f'bbox {",".join(map(str, box))}: expected 4 numbers x1,y1,x2,y2, got {len(box)}')
  try:
    x1, y1, x2, y2 = (float(v) for v in box)
  except ValueError:
    raise ValueError(f'bbox {",".join(map(str, box))}: expected 4 numbers x1,y1,x2,y2') from None
  if not (x2 > x1 and y2 > y1):
    raise ValueError(f'bbox {box}: expected x1,y1,x2,y2 with x2 > x1 and y2 > y1')
  t = (np.arange(n) + 0.5) / n
  xs, ys = np.meshgrid(x1 + t * (x2 - x1), y1 + t * (y2 - y1))
  return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)


def save(source_path, target_path, src_kps, trg_kps, output: str) -> None:
  """The JSON of one prediction and a PNG (source | target, a line per keypoint) next to it."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'w') as f:
    json.dump({'source': source_path, 'target': target_path, 'source_keypoints': src_kps.tolist(),
               'target_keypoints': trg_kps.tolist()}, f, indent=1)
  images = [read_image(p) for p in (source_path, target_path)]
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
  colours = plt.get_cmap('hsv')(np.linspace(0, 1, len(src_kps), endpoint=False))
  for ax, image, kps, title in zip(axes, images, (src_kps, trg_kps), ('source', 'predicted target')):
    ax.imshow(image)
    ax.scatter(kps[:, 0], kps[:, 1], c=colours, s=18, edgecolors='black', linewidths=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(os.path.splitext(output)[0] + '.png', dpi=100)
  plt.close(fig)


def _source_keypoints(keypoints_path, bbox, grid):
  if (keypoints_path is None) == (bbox is None):
    raise ValueError('give either keypoints (a JSON file) or a bbox (x1,y1,x2,y2)')
  return read_keypoints(keypoints_path) if keypoints_path else grid_in_box(bbox, grid)


def read_pairs_csv(csv_path: str, grid: int, size: int, full: int) -> list[tuple[str, str, Pair]]:
  """Batch mode's requests, all read and checked: (source path, target path, pair) per CSV row."""
  root = os.path.dirname(os.path.abspath(csv_path))
  try:
    with open(csv_path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise FileNotFoundError(f'{csv_path}: cannot read the pairs ({e.strerror})') from e
  requests = []
  for i, row in enumerate(rows):
    where = f'{csv_path} row {i + 2}'
    if not {'source', 'target'} <= set(row):
      raise ValueError(f'{where}: the CSV needs the columns source, target and keypoints or bbox')
    path = lambda key: os.path.join(root, row[key]) if row.get(key) else None
    try:
      bbox = row['bbox'].split(',') if row.get('bbox') else None
      kps = _source_keypoints(path('keypoints'), bbox, grid)
      requests.append((path('source'), path('target'),
                       read_pair(path('source'), path('target'), kps, size, full)))
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'{where}: {e}') from e
  return requests


def predict_pairs(predictor: Predictor, requests, output_dir: str, use_kbc: bool):
  """Batch mode: one JSON + PNG per request, named by its row number."""
  for i, (source, target, pair) in enumerate(requests):
    save(source, target, pair.keypoints, predictor.transfer(pair, use_kbc),
         os.path.join(output_dir, f'{i:05d}.json'))
  logging.info('Wrote %d predictions to %s', len(requests), output_dir)


def _define_flags():
  """The command's flags (defined only when it runs: tests import this module)."""
  cli.DEFINE_path('workdir', None, 'A run (config.json and checkpoints).')
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step number.")
  cli.DEFINE_path('source', None, 'Source image.')
  cli.DEFINE_path('target', None, 'Target image.')
  cli.DEFINE_path('keypoints', None, 'JSON file of source keypoints [[x, y], ...].')
  flags.DEFINE_list('bbox', None, 'x1,y1,x2,y2: sample a grid of source keypoints inside it.')
  flags.DEFINE_integer('grid', 5, 'With --bbox: grid x grid keypoints.')
  flags.DEFINE_bool('kbc', True, 'KBC second pass on crops around the keypoints.')
  cli.DEFINE_path('output', 'prediction.json', 'Output JSON (a PNG is written next to it).')
  cli.DEFINE_path('pairs', None, 'Batch mode: CSV with source, target, keypoints or bbox.')
  cli.DEFINE_path('output_dir', 'predictions', 'Batch mode: where the outputs go.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  # Every input is read and checked before the model loads (which takes a while).
  config = rundir.read_config(f.workdir)
  size, full = config.input.image_size, full_size(config)
  rundir.parse_checkpoint(f.checkpoint)
  if f.pairs:
    requests = read_pairs_csv(f.pairs, f.grid, size, full)
  elif f.source and f.target:
    kps = _source_keypoints(f.keypoints, f.bbox, f.grid)
    requests = [(f.source, f.target, read_pair(f.source, f.target, kps, size, full))]
  else:
    raise app.UsageError('give --source and --target (or --pairs)')
  predictor = Predictor.load(f.workdir, f.checkpoint)
  if f.pairs:
    predict_pairs(predictor, requests, f.output_dir, f.kbc)
    return
  source, target, pair = requests[0]
  save(source, target, pair.keypoints, predictor.transfer(pair, f.kbc), f.output)
  logging.info('Wrote %s and its PNG', f.output)


def run():
  """The misc-jax-predict console script."""
  cli.run(main, _define_flags, __name__)


if __name__ == '__main__':
  run()
