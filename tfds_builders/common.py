"""What the builders of the real datasets share: a manual-download base class, and readers of images, JSON,
CSV and .mat files whose errors name the file and the field.

A bad input fails the build with `features.InvalidExampleError`, whose message names the file and field.
With `skip_bad_examples=True` (`python -m tfds_builders.build ... --skip_bad_examples`) the pair is skipped
instead, counted in `builder.skipped`, and `build` writes the skipped keys and reasons to a log. TFDS writes
a dataset into a temporary directory and renames it only when every split is done, so a failed build leaves
nothing that looks complete.
"""

import csv
import io
import json
import os
from typing import Any, Callable, Iterable, NamedTuple

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import scipy.io
import tensorflow_datasets as tfds

from misc_jax import features

Error = features.InvalidExampleError


class LoadedImage(NamedTuple):
  """What gets written (the file's own bytes when they can be stored as they are, else pixels), and the
  size."""
  data: bytes | np.ndarray
  height: int
  width: int


def fail(path: str, field: str, message: str):
  raise Error(f'{path}: field {field}: {message}')


def read_image(path: str, mirror: bool = False) -> LoadedImage:
  """Reads and fully decodes an image (so a truncated or corrupt file fails here, naming it).

  A JPEG or PNG that is RGB or grey is stored as its own bytes (no second lossy encoding); anything else,
  or a mirrored image, as RGB pixels that TFDS encodes.
  """
  try:
    raw = epath.Path(path).read_bytes()
  except OSError as e:
    fail(path, 'image', f'cannot read the file ({e.strerror})')
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()
      keep_bytes = image.format in ('JPEG', 'PNG') and image.mode in ('RGB', 'L') and not mirror
      pixels = None if keep_bytes else np.asarray(image.convert('RGB'))
      width, height = image.size
  except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated data
    fail(path, 'image', f'not a decodable image ({e})')
  if pixels is not None and mirror:
    pixels = np.ascontiguousarray(pixels[:, ::-1])
  return LoadedImage(raw if keep_bytes else pixels, height, width)


def read_lines(path: str) -> list[str]:
  """The non-blank lines, stripped (a last line without its newline is kept)."""
  try:
    return [line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip()]
  except OSError as e:
    fail(path, '(file)', f'cannot read the file ({e.strerror})')


def read_json(path: str) -> Any:
  try:
    return json.loads(epath.Path(path).read_text())
  except OSError as e:
    fail(path, '(file)', f'cannot read the file ({e.strerror})')
  except json.JSONDecodeError as e:
    fail(path, '(file)', f'malformed JSON: {e}')


def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
  """The header and the rows of a CSV file (blank lines dropped)."""
  try:
    text = epath.Path(path).read_text()
  except OSError as e:
    fail(path, '(file)', f'cannot read the file ({e.strerror})')
  rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
  if not rows:
    fail(path, '(header)', 'the file is empty')
  return rows[0], rows[1:]


def read_csv_records(path: str, required: Iterable[str]) -> list[dict[str, str]]:
  """The rows of a CSV file as {column name: value}, read by the header's names (never by position);
  a missing required column or a row of the wrong length fails naming the file (and row)."""
  header, rows = read_csv(path)
  header = [name.strip() for name in header]
  missing = [name for name in required if name not in header]
  if missing:
    fail(path, missing[0], f'no such column; the header is {",".join(header)}')
  records = []
  for i, row in enumerate(rows):
    if len(row) != len(header):
      fail(f'{path} row {i + 2}', '(row)', f'{len(row)} columns, the header has {len(header)}')
    records.append(dict(zip(header, (cell.strip() for cell in row))))
  return records


def read_mat(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """The arrays `keys` of a MATLAB file; a missing key fails naming the keys the file does hold."""
  try:
    with epath.Path(path).open('rb') as f:
      mat = scipy.io.loadmat(f)
  except (OSError, ValueError) as e:
    fail(path, '(file)', f'not a readable .mat file ({e})')
  present = sorted(k for k in mat if not k.startswith('__'))
  out = {}
  for key in keys:
    if key not in mat:
      fail(path, key, f'no such key; the file holds {present}')
    out[key] = np.asarray(mat[key], np.float64)
  return out


def number(value: str, path: str, field: str) -> float:
  try:
    return float(value)
  except ValueError:
    fail(path, field, f'{value!r} is not a number')


def keypoint_box(keypoints: np.ndarray, visible: np.ndarray) -> np.ndarray:
  """(x1, y1, x2, y2) of the visible keypoints of each instance, at least 1 px wide and high.

  Datasets without boxes (PF-WILLOW, PF-PASCAL in the NC-Net flavour) use it; padded or missing keypoints
  never enter it (the bug REFERENCE.md section 4 warns about).
  """
  boxes = []
  for kps, vis in zip(keypoints, visible):
    pts = kps[vis] if vis.any() else np.zeros((1, 2), np.float32)
    lo, hi = pts.min(0), pts.max(0)
    hi = np.maximum(hi, lo + 1.)
    boxes.append([lo[0], lo[1], hi[0], hi[1]])
  return np.asarray(boxes, np.float32)


def side(image: LoadedImage, keypoints, visible, bboxes, masks=()) -> dict:
  """One side of a pair, as `finish` expects it: K keypoints per instance, masks as [H, W] bool."""
  keypoints = np.asarray(keypoints, np.float32)
  visible = np.asarray(visible, bool)
  return {
      'image': image,
      'instance_ids': np.arange(len(keypoints), dtype=np.int64),
      'keypoints': np.where(visible[..., None], keypoints, 0.).astype(np.float32),
      'keypoint_visible': visible,
      'bboxes': np.asarray(bboxes, np.float32).reshape(-1, 4),
      'masks': list(masks),
  }


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders that read archives the user unpacked into the manual directory."""

  def __init__(self, *, skip_bad_examples: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.skip_bad_examples = skip_bad_examples
    self.skipped: list[tuple[str, str, str]] = []  # (split, key, reason)

  def skip_or_raise(self, split: str, key: str, error: Error) -> None:
    if not self.skip_bad_examples:
      raise error
    self.skipped.append((split, key, str(error)))
    logging.warning('Skipped %s/%s %s: %s', self.name, split, key, error)

  def checked_examples(self, split: str, jobs: Iterable[tuple[str, Callable[[], dict]]]):
    """Yields (key, example) for each (key, make_example): validated, masks encoded as 0/255 PNG input.

    A job whose inputs are bad raises (naming the file and field) or is skipped (`skip_bad_examples`).
    """
    written = 0
    for key, make in jobs:
      try:
        example = make()
        example['pair_id'] = key
        views = {name: {**example[name], 'image': (example[name]['image'].height,
                                                   example[name]['image'].width)}
                 for name in features.SIDES}
        features.validate_pair(views, dataset=self.name, split=split, key=key)
      except Error as e:
        self.skip_or_raise(split, key, e)
        continue
      for name in features.SIDES:  # New dicts: a builder may cache and reuse its sides.
        s = example[name]
        example[name] = {**s, 'image': s['image'].data,
                         'masks': [m[..., None].astype(np.uint8) * 255 for m in s['masks']]}
      written += 1
      yield key, example
    if not written:
      reasons = [reason for s, _, reason in self.skipped if s == split]
      raise Error(f'{self.name}/{split}: no pair left' + (
          f'; all {len(reasons)} were skipped, the first because {reasons[0]}' if reasons else ''))


def drop_empty_splits(name: str, pairs: dict[str, list], images: dict[str, int]) -> dict[str, list]:
  """The splits that hold at least one pair. TFDS cannot write an empty split, and a small set (a user's
  few categories, a test fixture) may leave a derived split such as MISC210K's validation without a pair:
  such a split is left out with a warning that says how many images it held, instead of failing the build.
  Fails only when no split has a pair."""
  kept = {split: p for split, p in pairs.items() if p}
  for split in pairs.keys() - kept.keys():
    logging.warning('%s/%s: %d images but no pair of two images of one category; the split is left out of '
                    'the build (choose an evaluation split among %s)', name, split, images.get(split, 0),
                    sorted(kept))
  if not kept:
    raise Error(f'{name}: no split has a pair of two images of one category ({images} images by split)')
  return kept


def manual_path(dl_manager, *parts: str) -> str:
  return os.path.join(os.fspath(dl_manager.manual_dir), *parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists()
