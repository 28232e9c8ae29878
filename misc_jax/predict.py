r"""Transfers keypoints from a source image to a target image with a trained run.

  python -m misc_jax.predict --workdir runs/demo --source a.jpg --target b.jpg --keypoints kps.json \
      --output out.json                         # kps.json: [[x, y], ...] in source pixels
  misc-jax-predict --workdir runs/demo --source a.jpg --target b.jpg --bbox 10,20,90,120 --grid 4 \
      --output out.json                         # a 4 x 4 grid of keypoints inside the box
  misc-jax-predict --workdir runs/demo --pairs pairs.csv --output_dir predictions/

Writes the predicted target keypoints (JSON, target image pixels) and a PNG of the matches next to it.
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

from misc_jax import kbc
from misc_jax import train

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top



_KEYPOINT_BLOCK = 32  # keypoint lists are padded to a multiple of this


@dataclasses.dataclass
class Predictor:
  """A run's model, ready to transfer keypoints between two images of any size."""
  config: object
  model_module: object
  state: object
  step: int

  @classmethod
  def load(cls, workdir: str, checkpoint: str = 'latest') -> 'Predictor':
    return cls(*train.load_run(workdir, checkpoint))

  def __post_init__(self):
    self._transfer = jax.jit(self._transfer_fn, static_argnames='use_kbc')

  def _transfer_fn(self, source, target, kps, valid, use_kbc):
    variables = {'params': self.state.params, 'batch_stats': self.state.batch_stats}
    apply_fn = lambda s, t: _scores(self.state.apply_fn(variables, s, t))
    size = self.config.input.image_size
    transfer = lambda scores, k, v: self.model_module.predict_keypoints(
        scores, k, v, size, **self.model_module.transfer_kwargs(self.config.model))
    pred = transfer(apply_fn(source, target), kps, valid)
    if use_kbc:
      pred = kbc.predict(apply_fn, transfer, source, target, kps, valid, pred, self.config.kbc)
    return pred

  def __call__(self, source_path: str, target_path: str, keypoints, use_kbc: bool = True) -> np.ndarray:
    """Source keypoints [N, 2] (source pixels) -> target keypoints [N, 2] (target pixels)."""
    size = self.config.input.image_size
    source, src_hw = load_image(source_path, size)
    target, trg_hw = load_image(target_path, size)
    keypoints = np.asarray(keypoints, np.float32).reshape(-1, 2)
    check_keypoints(keypoints, src_hw, source_path)
    to_input = lambda hw: np.array([size / hw[1], size / hw[0]], np.float32)  # (sx, sy)
    n = len(keypoints)
    padded = -(-n // _KEYPOINT_BLOCK) * _KEYPOINT_BLOCK  # a few shapes, so few compilations
    kps = np.zeros((1, padded, 2), np.float32)
    kps[0, :n] = keypoints * to_input(src_hw)
    pred = self._transfer(source[None], target[None], kps, np.arange(padded)[None] < n, use_kbc=use_kbc)
    return np.asarray(pred[0, :n]) / to_input(trg_hw)


def _scores(out):
  return out['scores'] if isinstance(out, dict) else out  # the dual-path model also returns masks


def load_image(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """An image file -> (uint8 [size, size, 3] resized as in training, its original (H, W))."""
  try:
    with Image.open(path) as image:
      image = image.convert('RGB')
      hw = (image.height, image.width)
      resized = image.resize((size, size), Image.BILINEAR)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: no such image') from e
  except OSError as e:
    raise ValueError(f'{path}: cannot decode the image ({e})') from e
  return np.asarray(resized, np.uint8), hw


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
  kps = np.asarray(data['keypoints'] if isinstance(data, dict) else data, np.float32)
  if kps.ndim != 2 or kps.shape[1] != 2:
    raise ValueError(f'{path}: expected [[x, y], ...], got an array of shape {kps.shape}')
  return kps


def grid_in_box(box, n: int) -> np.ndarray:
  """n x n keypoints evenly inside box (x1, y1, x2, y2) (cell centres) -> [n * n, 2]."""
  x1, y1, x2, y2 = (float(v) for v in box)
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
  images = [np.asarray(Image.open(p).convert('RGB')) for p in (source_path, target_path)]
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


def predict_pairs(predictor: Predictor, csv_path: str, output_dir: str, grid: int, use_kbc: bool):
  """Batch mode: one JSON + PNG per CSV row, named by row number."""
  root = os.path.dirname(os.path.abspath(csv_path))
  with open(csv_path, newline='') as f:
    rows = list(csv.DictReader(f))
  for i, row in enumerate(rows):
    where = f'{csv_path} row {i + 2}'
    if not {'source', 'target'} <= set(row):
      raise ValueError(f'{where}: the CSV needs the columns source, target and keypoints or bbox')
    path = lambda key: os.path.join(root, row[key]) if row.get(key) else None
    try:
      bbox = row['bbox'].split(',') if row.get('bbox') else None
      kps = _source_keypoints(path('keypoints'), bbox, grid)
      pred = predictor(path('source'), path('target'), kps, use_kbc)
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'{where}: {e}') from e
    save(path('source'), path('target'), kps, pred, os.path.join(output_dir, f'{i:05d}.json'))
  logging.info('Wrote %d predictions to %s', len(rows), output_dir)


def _define_flags():
  """The command's flags (defined only when it runs: tests import this module)."""
  flags.DEFINE_string('workdir', None, 'A run (config.json and checkpoints).')
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step number.")
  flags.DEFINE_string('source', None, 'Source image.')
  flags.DEFINE_string('target', None, 'Target image.')
  flags.DEFINE_string('keypoints', None, 'JSON file of source keypoints [[x, y], ...].')
  flags.DEFINE_list('bbox', None, 'x1,y1,x2,y2: sample a grid of source keypoints inside it.')
  flags.DEFINE_integer('grid', 5, 'With --bbox: grid x grid keypoints.')
  flags.DEFINE_bool('kbc', True, 'KBC second pass on crops around the keypoints.')
  flags.DEFINE_string('output', 'prediction.json', 'Output JSON (a PNG is written next to it).')
  flags.DEFINE_string('pairs', None, 'Batch mode: CSV with source, target, keypoints or bbox.')
  flags.DEFINE_string('output_dir', 'predictions', 'Batch mode: where the outputs go.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  predictor = Predictor.load(f.workdir, f.checkpoint)
  if f.pairs:
    predict_pairs(predictor, f.pairs, f.output_dir, f.grid, f.kbc)
    return
  if not (f.source and f.target):
    raise app.UsageError('give --source and --target (or --pairs)')
  kps = _source_keypoints(f.keypoints, f.bbox, f.grid)
  pred = predictor(f.source, f.target, kps, f.kbc)
  save(f.source, f.target, kps, pred, f.output)
  logging.info('Wrote %s and its PNG', f.output)


def run():
  """The misc-jax-predict console script."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
