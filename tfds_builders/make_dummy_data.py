"""Writes the `dummy_data/` fixtures of the real-dataset builders: `python -m tfds_builders.make_dummy_data`.

Each fixture reproduces its dataset's on-disk layout, file names and field names (REFERENCE.md section 3)
with a few tiny noise images and hand-written annotations. The builder tests check the decoded records
against the values written here, so change both together.
"""

import csv
import json
import os
import shutil

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import scipy.io

_HERE = os.path.dirname(os.path.abspath(__file__))
_RNG = np.random.default_rng(0)


def _image(path, width, height, grey=False, rng=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = rng or _RNG
  pixels = rng.integers(0, 256, (height, width) if grey else (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def _json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f, indent=1)


def _csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows([header] + rows)


def _coco_keypoints(points: dict[int, tuple[float, float, int]]) -> list[float]:
  flat = [0.] * 52 * 3
  for k, (x, y, v) in points.items():
    flat[3 * k:3 * k + 3] = [x, y, v]
  return flat


def _rectangle_rle(height, width, rows, cols, compressed):
  mask = np.zeros((height, width), np.uint8)
  mask[rows[0]:rows[1], cols[0]:cols[1]] = 1
  if compressed:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {'size': [height, width], 'counts': rle['counts'].decode()}
  flat = mask.flatten(order='F')  # COCO runs are column-major and start with a run of zeros
  changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  return {'size': [height, width], 'counts': np.diff(np.concatenate([[0], changes])).tolist()}


def misc210k(root):
  images = os.path.join(root, 'coco/trainval2014')
  split_dir = os.path.join(root, 'misc210k_cocosplit/datasplit')
  categories = [{'id': 1, 'name': 'person'}, {'id': 17, 'name': 'cat'}, {'id': 18, 'name': 'dog'}]
  entries = {1: ('COCO_train2014_000000000001.jpg', 40, 48), 2: ('COCO_train2014_000000000002.jpg', 32, 40),
             3: ('COCO_val2014_000000000003.jpg', 36, 36), 4: ('COCO_train2014_000000000004.jpg', 30, 30),
             5: ('COCO_train2014_000000000005.jpg', 30, 30), 10: ('COCO_val2014_000000000010.jpg', 32, 32),
             11: ('COCO_val2014_000000000011.jpg', 32, 40),
             # CRC-32 of these names puts them in the held-out validation split (the builder's docstring).
             20: ('COCO_train2014_000000000020.jpg', 30, 36),
             124: ('COCO_train2014_000000000124.jpg', 36, 30)}
  held_out_rng = np.random.default_rng(20)  # added later: the other fixtures' images stay as they were
  for image_id, (name, h, w) in entries.items():
    _image(os.path.join(images, name), w, h, grey=image_id == 3,
           rng=held_out_rng if image_id in (20, 124) else None)

  def ann(ann_id, image_id, category_id, bbox, segmentation, keypoints, iscrowd=0):
    kps = _coco_keypoints(keypoints)
    return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': bbox,
            'area': bbox[2] * bbox[3], 'iscrowd': iscrowd, 'segmentation': segmentation,
            'keypoints': kps, 'num_keypoints': len(keypoints)}

  train = [
      ann(101, 1, 18, [4, 4, 16, 12], [[4, 4, 20, 4, 20, 16, 4, 16]],
          {0: (6, 5, 2), 1: (18, 14, 1), 51: (10, 10, 2)}),
      ann(102, 2, 18, [6, 4, 14, 6], _rectangle_rle(32, 40, (4, 10), (6, 20), compressed=False),
          {0: (7, 5, 2), 2: (15, 8, 2)}),
      ann(103, 2, 18, [24, 16, 10, 10], [[24, 16, 34, 16, 34, 26, 24, 26]], {0: (30, 20, 2)}),
      ann(104, 2, 18, [0, 0, 40, 32], _rectangle_rle(32, 40, (0, 32), (0, 40), compressed=False), {},
          iscrowd=1),
      ann(105, 3, 18, [12, 10, 18, 10], _rectangle_rle(36, 36, (10, 20), (12, 30), compressed=True),
          {1: (20, 15, 2)}),
      ann(106, 3, 1, [2, 20, 10, 14], [[2, 20, 12, 20, 12, 34, 2, 34]], {5: (6, 30, 2)}),
      ann(107, 4, 1, [5, 5, 20, 20], [[5, 5, 25, 5, 25, 25, 5, 25]], {5: (15, 22, 2), 6: (10, 8, 2)}),
      ann(108, 5, 18, [0, 0, 30, 30], _rectangle_rle(30, 30, (0, 30), (0, 30), compressed=False), {},
          iscrowd=1),
      ann(109, 20, 18, [3, 4, 20, 20], [[3, 4, 23, 4, 23, 24, 3, 24]], {0: (5, 6, 2), 2: (20, 20, 2)}),
      ann(110, 124, 18, [5, 5, 20, 15], [[5, 5, 25, 5, 25, 20, 5, 20]], {0: (7, 8, 2), 2: (22, 18, 1)}),
  ]
  test = [
      ann(201, 10, 17, [2, 2, 12, 12], [[2, 2, 14, 2, 14, 14, 2, 14]], {0: (5, 5, 2), 3: (12, 12, 2)}),
      ann(202, 10, 17, [18, 18, 12, 12], [[18, 18, 30, 18, 30, 30, 18, 30]], {0: (20, 20, 2)}),
      ann(203, 11, 17, [10, 8, 20, 16], [[10, 8, 30, 8, 30, 24, 10, 24]], {0: (12, 10, 2), 3: (28, 20, 1)}),
  ]

  def coco(ids, annotations):
    return {'images': [{'id': i, 'file_name': entries[i][0], 'height': entries[i][1],
                        'width': entries[i][2]} for i in ids],
            'annotations': annotations, 'categories': categories}

  _json(os.path.join(split_dir, 'misc_trainvalno5k.json'), coco([1, 2, 3, 4, 5, 20, 124], train))
  _json(os.path.join(split_dir, 'misc_5k.json'), coco([10, 11], test))


def spair71k(root):
  sizes = {'cat': {'2008_000001': (40, 30), '2008_000002': (36, 36), '2008_000003': (30, 40)},
           'car': {'2009_000001': (40, 32), '2009_000002': (40, 32)}}
  voc_index = {'cat': 8, 'car': 7}
  for category, images in sizes.items():
    for stem, (w, h) in images.items():
      _image(os.path.join(root, 'JPEGImages', category, stem + '.jpg'), w, h)
      labels = np.zeros((h, w), np.uint8)
      labels[5:20, 4:24] = voc_index[category]
      labels[4, 4:24] = 255  # the VOC border label
      os.makedirs(os.path.join(root, 'Segmentation', category), exist_ok=True)
      Image.fromarray(labels).save(os.path.join(root, 'Segmentation', category, stem + '.png'))

  def pair(split, pair_id, category, src, trg, kps_ids, src_kps, trg_kps, **attributes):
    name = f'{pair_id:06d}-{src}-{trg}:{category}'
    (sw, sh), (tw, th) = sizes[category][src], sizes[category][trg]
    _json(os.path.join(root, 'PairAnnotation', split, name + '.json'), {
        'pair_id': pair_id, 'filename': name, 'src_imname': src + '.jpg', 'trg_imname': trg + '.jpg',
        'src_imsize': [sw, sh, 3], 'trg_imsize': [tw, th, 3], 'src_bndbox': [2, 3, 25, 22],
        'trg_bndbox': [4, 5, 28, 26], 'category': category, 'src_kps': src_kps, 'trg_kps': trg_kps,
        'kps_ids': [str(k) for k in kps_ids], 'mirror': 0, 'viewpoint_variation': 0,
        'scale_variation': 0, 'truncation': 0, 'occlusion': 0} | attributes)
    return name

  layout = {
      'trn': [pair('trn', 1, 'cat', '2008_000001', '2008_000002', [0, 7, 29], [[5, 6], [10, 12], [20, 8]],
                   [[6, 7], [12, 14], [22, 10]], viewpoint_variation=2, occlusion=1),
              pair('trn', 2, 'car', '2009_000001', '2009_000002', [3], [[9, 9]], [[11, 10]], mirror=1)],
      'val': [pair('val', 3, 'cat', '2008_000002', '2008_000003', [1, 2], [[4, 4], [8, 8]],
                   [[5, 5], [9, 9]], scale_variation=1)],
      'test': [pair('test', 4, 'cat', '2008_000003', '2008_000001', [0, 5], [[3, 4], [12, 30]],
                    [[4, 5], [20, 25]], truncation=3),
               pair('test', 5, 'car', '2009_000002', '2009_000001', [0, 1], [[1, 1], [30, 20]],
                    [[2, 2], [31, 21]])],
  }
  for size, take in (('large', None), ('small', 1)):
    for split, names in layout.items():
      os.makedirs(os.path.join(root, 'Layout', size), exist_ok=True)
      with open(os.path.join(root, 'Layout', size, split + '.txt'), 'w') as f:
        f.write('\n'.join(names[:take]))  # no newline after the last line, as in the release


def pf_pascal(root):
  images = {'2007_000001': (40, 30), '2007_000002': (36, 36), '2007_000003': (32, 40),
            '2008_000004': (40, 40), '2008_000005': (30, 36)}
  nan = np.nan
  annotations = {  # (class, kps, bbox)
      '2007_000001': ('aeroplane', [[5, 6], [10, 12], [nan, nan], [20, 8]], [2, 3, 30, 25]),
      '2007_000002': ('aeroplane', [[6, 7], [12, 14], [15, 15], [nan, nan]], [4, 5, 30, 30]),
      '2007_000003': ('aeroplane', [[3, 4], [8, 9], [10, 30], [25, 35]], [1, 2, 30, 38]),
      '2008_000004': ('dog', [[5, 5], [30, 30], [20, 10]], [2, 2, 35, 35]),
      '2008_000005': ('dog', [[6, 6], [25, 30], [nan, nan]], [3, 3, 28, 34]),
  }
  for stem, (w, h) in images.items():
    _image(os.path.join(root, 'JPEGImages', stem + '.jpg'), w, h)
    category, kps, bbox = annotations[stem]
    os.makedirs(os.path.join(root, 'Annotations', category), exist_ok=True)
    scipy.io.savemat(os.path.join(root, 'Annotations', category, stem + '.mat'),
                     {'kps': np.array(kps, np.float64), 'bbox': np.array([bbox], np.float64)})
  prefix = 'PF-dataset-PASCAL/JPEGImages/'

  def coords(values):  # NC-Net's format: ';'-separated, padded to 20 with -1
    return ';'.join(f'{v:g}' for v in values + [-1] * (20 - len(values)))

  def with_coords(source, target, cls):  # the columns of the release's val and test files
    both = [k for k in range(len(annotations[source][1])) if not (
        np.isnan(annotations[source][1][k]).any() or np.isnan(annotations[target][1][k]).any())]
    xy = lambda stem, axis: coords([annotations[stem][1][k][axis] for k in both])
    return [prefix + source + '.jpg', prefix + target + '.jpg', cls, xy(source, 0), xy(source, 1),
            xy(target, 0), xy(target, 1)]

  # Only the training file has a flip column; validation and test carry coordinates instead.
  _csv(os.path.join(root, 'trn_pairs.csv'), ['source_image', 'target_image', 'class', 'flip'], [
      [prefix + '2007_000001.jpg', prefix + '2007_000002.jpg', 1, 0],
      [prefix + '2007_000002.jpg', prefix + '2007_000003.jpg', 1, 1],
      [prefix + '2008_000004.jpg', prefix + '2008_000005.jpg', 12, 0]])
  header = ['source_image', 'target_image', 'class', 'XA', 'YA', 'XB', 'YB']
  _csv(os.path.join(root, 'val_pairs.csv'), header, [with_coords('2007_000003', '2007_000001', 1)])
  _csv(os.path.join(root, 'test_pairs.csv'), header, [with_coords('2007_000001', '2007_000003', 1),
                                                      with_coords('2008_000005', '2008_000004', 12)])

  # The NC-Net flavour: image_pairs/ and the images under PF-dataset-PASCAL/JPEGImages/.
  for stem in ('2007_000001', '2007_000003', '2008_000004', '2008_000005'):
    os.makedirs(os.path.join(root, prefix), exist_ok=True)
    shutil.copy(os.path.join(root, 'JPEGImages', stem + '.jpg'), os.path.join(root, prefix))

  _csv(os.path.join(root, 'image_pairs/test_pairs.csv'),
       ['source_image', 'target_image', 'class', 'XA', 'YA', 'XB', 'YB'], [
           [prefix + '2007_000001.jpg', prefix + '2007_000003.jpg', 1, coords([5, 10, 20]),
            coords([6, 12, 8]), coords([3, 8, 25]), coords([4, 9, 35])],
           [prefix + '2008_000005.jpg', prefix + '2008_000004.jpg', 12, coords([6, 25]), coords([6, 30]),
            coords([5, 30]), coords([5, 30])]])


def pf_willow(root):
  files = {'car(G)/Cars_006a.png': (40, 30), 'car(G)/Cars_007a.png': (36, 36),
           'duck(S)/duck_001.png': (30, 40), 'duck(S)/duck_002.png': (40, 32)}
  for name, (w, h) in files.items():  # duck(S) is stored flattened (without PF-dataset/)
    _image(os.path.join(root, name if name.startswith('duck') else 'PF-dataset/' + name), w, h)
  header = (['imageA', 'imageB'] + [f'XA{i}' for i in range(1, 11)] + [f'YA{i}' for i in range(1, 11)] +
            [f'XB{i}' for i in range(1, 11)] + [f'YB{i}' for i in range(1, 11)])

  def row(a, b, offset):
    xa, ya = [2 + 3 * i for i in range(10)], [3 + 2 * i for i in range(10)]
    xb, yb = [x + offset for x in xa], [y + offset for y in ya]
    return ['PF-dataset/' + a, 'PF-dataset/' + b] + xa + ya + xb + yb

  _csv(os.path.join(root, 'test_pairs.csv'), header, [
      row('car(G)/Cars_006a.png', 'car(G)/Cars_007a.png', 1),
      row('car(G)/Cars_007a.png', 'car(G)/Cars_006a.png', 0),
      row('duck(S)/duck_001.png', 'duck(S)/duck_002.png', 2)])


def main():
  for name, make in (('misc210k', misc210k), ('spair71k', spair71k), ('pf_pascal', pf_pascal),
                     ('pf_willow', pf_willow)):
    root = os.path.join(_HERE, name, 'dummy_data')
    shutil.rmtree(root, ignore_errors=True)
    make(root)
    print('wrote', root)


if __name__ == '__main__':
  main()
