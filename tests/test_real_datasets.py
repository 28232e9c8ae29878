"""The real-dataset builders on their dummy_data/ fixtures: decoded values, bad inputs, evaluation end to end.

Expected values are the ones tfds_builders/make_dummy_data.py writes, typed here by hand.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

from configs import synthetic
from misc_jax import features
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from misc_jax.evaluators import pck as pck_evaluator
from tfds_builders import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ('misc210k', 'spair71k', 'pf_pascal/chm', 'pf_pascal/ncnet', 'pf_willow')


def _dummy(name):
  return os.path.join(REPO, 'tfds_builders', name.split('/')[0], 'dummy_data')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('real'))
  for name in DATASETS:
    build.build(name, path, manual_dir=_dummy(name))
  return path


def _pairs(name, data_dir, split):
  ds = build.get_builder(name, data_dir).as_dataset(split=split)
  return {ex['pair_id'].decode(): ex for ex in tfds.as_numpy(ds)}


def _rectangle(shape, rows, cols):
  mask = np.zeros(shape, bool)
  mask[rows[0]:rows[1], cols[0]:cols[1]] = True
  return mask


def test_misc210k_values(data_dir):
  pairs = _pairs('misc210k', data_dir, 'train')
  assert set(pairs) == {'dog-1-2', 'dog-1-3', 'dog-2-3', 'dog-2-1', 'dog-3-1', 'dog-3-2',
                        'person-3-4', 'person-4-3'}
  src, trg = pairs['dog-1-2']['source'], pairs['dog-1-2']['target']
  assert src['image'].shape == (40, 48, 3) and trg['image'].shape == (32, 40, 3)
  np.testing.assert_array_equal(np.flatnonzero(src['keypoint_visible'][0]), [0, 1, 51])  # v = 2, 1, 2
  np.testing.assert_array_equal(src['keypoints'][0, [0, 1, 51]], [[6, 5], [18, 14], [10, 10]])
  np.testing.assert_array_equal(src['bboxes'], [[4, 4, 20, 16]])
  polygon = src['masks'][0, ..., 0] > 0  # the square polygon (4, 4)-(20, 16), rasterised by pycocotools
  assert polygon[5:15, 5:19].all() and not polygon[:3].any() and not polygon[:, 21:].any()
  # Image 2: two dog instances; its crowd annotation is dropped.
  assert list(trg['instance_ids']) == [0, 1] and trg['masks'].shape == (2, 32, 40, 1)
  np.testing.assert_array_equal(trg['masks'][0, ..., 0] > 0, _rectangle((32, 40), (4, 10), (6, 20)))
  np.testing.assert_array_equal(trg['keypoints'][0, [0, 2]], [[7, 5], [15, 8]])
  np.testing.assert_array_equal(trg['bboxes'][1], [24, 16, 34, 26])
  grey = pairs['dog-3-1']['source']  # a grey JPEG, compressed RLE
  assert grey['image'].shape == (36, 36, 3) and (grey['image'][..., 0] == grey['image'][..., 2]).all()
  np.testing.assert_array_equal(grey['masks'][0, ..., 0] > 0, _rectangle((36, 36), (10, 20), (12, 30)))
  person = pairs['person-3-4']
  assert person['category'] == 0 and len(person['source']['instance_ids']) == 1
  held_out = _pairs('misc210k', data_dir, 'validation')  # images 20, 124: CRC-32 of their names
  assert set(held_out) == {'dog-20-124', 'dog-124-20'}
  np.testing.assert_array_equal(held_out['dog-20-124']['source']['keypoints'][0, [0, 2]], [[5, 6], [20, 20]])
  test = _pairs('misc210k', data_dir, 'test')
  assert set(test) == {'cat-10-11', 'cat-11-10'}
  assert len(test['cat-10-11']['source']['instance_ids']) == 2


def test_misc210k_takes_an_official_pair_list(tmp_path):
  """A pairs_<split>.json in the manual dir replaces the builder's own pairs (each image with the next 45
  of its category), so numbers can be compared with a published pair list; a name in no annotation file
  is refused, naming the file and the entry."""
  manual = tmp_path / 'manual'
  shutil.copytree(_dummy('misc210k'), manual)
  split_dir = manual / 'misc210k_cocosplit' / 'datasplit'
  listed = [['COCO_train2014_000000000002.jpg', 'COCO_train2014_000000000001.jpg', 'dog'],
            ['COCO_val2014_000000000003.jpg', 'COCO_train2014_000000000004.jpg', 'person']]
  (split_dir / 'pairs_train.json').write_text(json.dumps(listed))
  build.build('misc210k', str(tmp_path / 'records'), manual_dir=str(manual))
  assert set(_pairs('misc210k', str(tmp_path / 'records'), 'train')) == {'dog-2-1', 'person-3-4'}
  (split_dir / 'pairs_train.json').write_text(json.dumps(listed + [['COCO_x.jpg', 'COCO_y.jpg', 'dog']]))
  with pytest.raises(features.InvalidExampleError, match=r"pairs_train.json.*\[2\].*'COCO_x.jpg'"):
    build.build('misc210k', str(tmp_path / 'again'), manual_dir=str(manual))


def test_spair71k_values(data_dir):
  pairs = _pairs('spair71k', data_dir, 'train')
  pair = pairs['000001-2008_000001-2008_000002:cat']
  src = pair['source']
  assert src['image'].shape == (30, 40, 3)
  np.testing.assert_array_equal(np.flatnonzero(src['keypoint_visible'][0]), [0, 7, 29])
  np.testing.assert_array_equal(src['keypoints'][0, [0, 7, 29]], [[5, 6], [10, 12], [20, 8]])
  np.testing.assert_array_equal(pair['target']['keypoints'][0, [0, 7, 29]], [[6, 7], [12, 14], [22, 10]])
  np.testing.assert_array_equal(src['bboxes'], [[2, 3, 25, 22]])
  # The category's pixels (VOC index 8), not the 255 border row above them.
  np.testing.assert_array_equal(src['masks'][0, ..., 0] > 0, _rectangle((30, 40), (5, 20), (4, 24)))
  assert pair['attributes'] == {'viewpoint_variation': 2, 'scale_variation': 0, 'truncation': 0,
                                'occlusion': 1, 'mirror': 0}
  assert pairs['000002-2009_000001-2009_000002:car']['attributes']['mirror'] == 1
  test = _pairs('spair71k', data_dir, 'test')  # test.txt has no newline after its last line
  assert set(test) == {'000004-2008_000003-2008_000001:cat', '000005-2009_000002-2009_000001:car'}


def test_pf_pascal_chm_values(data_dir):
  pairs = _pairs('pf_pascal/chm', data_dir, 'train')
  plain = pairs['00000-2007_000001-2007_000002']
  # The source lacks keypoint 2 and the target keypoint 3: a pair keeps those valid in both.
  np.testing.assert_array_equal(plain['source']['keypoint_visible'][0, :5], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(plain['source']['keypoints'][0, :2], [[5, 6], [10, 12]])
  np.testing.assert_array_equal(plain['source']['bboxes'], [[2, 3, 30, 25]])
  flipped = pairs['00001-2007_000002-2007_000003']  # flip = 1: x -> W - x in both images
  np.testing.assert_array_equal(flipped['source']['keypoints'][0, :3], [[30, 7], [24, 14], [21, 15]])
  np.testing.assert_array_equal(flipped['source']['bboxes'], [[6, 5, 32, 30]])
  np.testing.assert_array_equal(flipped['target']['keypoints'][0, 0], [29, 4])
  with Image.open(os.path.join(_dummy('pf_pascal'), 'JPEGImages', '2007_000002.jpg')) as f:
    original = np.asarray(f, np.float32)
  image = flipped['source']['image'].astype(np.float32)
  assert np.abs(image - original[:, ::-1]).mean() < 0.5 * np.abs(image - original).mean()
  assert pairs['00002-2008_000004-2008_000005']['category'] == 11  # class 12 (1-based): dog
  assert len(_pairs('pf_pascal/chm', data_dir, 'test')) == 2


def test_pf_pascal_ncnet_values(data_dir):
  pair = _pairs('pf_pascal/ncnet', data_dir, 'test')['00000-2007_000001-2007_000003']
  src = pair['source']
  np.testing.assert_array_equal(src['keypoint_visible'][0], [1, 1, 1] + [0] * 17)  # -1 pads
  np.testing.assert_array_equal(src['keypoints'][0, :3], [[5, 6], [10, 12], [20, 8]])
  np.testing.assert_array_equal(src['bboxes'], [[5, 6, 20, 12]])  # the valid keypoints' extent
  np.testing.assert_array_equal(pair['target']['keypoints'][0, 2], [25, 35])


def test_pf_willow_values(data_dir):
  pairs = _pairs('pf_willow', data_dir, 'test')
  names = build.get_builder('pf_willow', data_dir).info.features['category'].names
  assert sorted(names[p['category']] for p in pairs.values()) == ['car(G)', 'car(G)', 'duck(S)']
  pair = pairs['0000-Cars_006a-Cars_007a']
  np.testing.assert_array_equal(pair['source']['keypoints'][0, [0, 9]], [[2, 3], [29, 21]])
  np.testing.assert_array_equal(pair['target']['keypoints'] - pair['source']['keypoints'], 1)
  np.testing.assert_array_equal(pair['source']['bboxes'], [[2, 3, 29, 21]])
  assert pairs['0002-duck_001-duck_002']['source']['image'].shape == (40, 30, 3)  # found flattened


def _rewrite_json(path, edit):
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, 'w') as f:
    json.dump(data, f)


MISC_TRAIN = 'misc210k_cocosplit/datasplit/misc_trainvalno5k.json'
MISC_TEST = 'misc210k_cocosplit/datasplit/misc_5k.json'


def _missing_image(root):
  os.remove(os.path.join(root, 'coco/trainval2014/COCO_train2014_000000000004.jpg'))


def _corrupt_jpeg(root):
  path = os.path.join(root, 'JPEGImages/car/2009_000001.jpg')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 3])


def _malformed_json(root):
  with open(os.path.join(root, 'PairAnnotation/test/000004-2008_000003-2008_000001:cat.json'), 'w') as f:
    f.write('{"pair_id": 3, "category": ')


def _short_keypoints(root):
  _rewrite_json(os.path.join(root, MISC_TRAIN),
                lambda d: d['annotations'][6].update(keypoints=d['annotations'][6]['keypoints'][:150]))


def _unknown_category(root):
  def edit(d):
    d['categories'].append({'id': 99, 'name': 'unicorn'})
    d['annotations'][1]['category_id'] = 99
  _rewrite_json(os.path.join(root, MISC_TEST), edit)


def _unknown_mat_key(root):
  path = os.path.join(root, 'Annotations/dog/2008_000005.mat')
  mat = scipy.io.loadmat(path)
  scipy.io.savemat(path, {'points': mat['kps'], 'bbox': mat['bbox']})


# (dataset, how to break the fixture, text the error must hold, pairs skipped with --skip_bad_examples)
BAD_INPUTS = {
    'missing image': ('misc210k', _missing_image,
                      ['COCO_train2014_000000000004.jpg', 'field image', 'cannot read'], 2),
    'corrupt jpeg': ('spair71k', _corrupt_jpeg, ['2009_000001.jpg', 'field image', 'not a decodable'], 2),
    'malformed json': ('spair71k', _malformed_json,
                       ['000004-2008_000003-2008_000001:cat.json', 'malformed JSON'], 1),
    'keypoints of the wrong length': ('misc210k', _short_keypoints,
                                      ['misc_trainvalno5k.json', 'annotations[6] (id 107).keypoints',
                                       '150 values'], 2),
    'category not in the list': ('misc210k', _unknown_category,
                                 ['misc_5k.json', 'annotations[1] (id 202).category_id', 'unicorn'], 1),
    'unknown .mat key': ('pf_pascal/chm', _unknown_mat_key,
                         ['2008_000005.mat', 'field kps', "holds ['bbox', 'points']"], 2),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_fails_naming_file_and_field_or_is_skipped(case, data_dir, tmp_path):
  name, corrupt, expected, num_skipped = BAD_INPUTS[case]
  manual = tmp_path / 'manual'
  shutil.copytree(_dummy(name), manual)
  corrupt(str(manual))
  records = str(tmp_path / 'records')
  with pytest.raises(features.InvalidExampleError) as error:
    build.build(name, records, manual_dir=str(manual))
  for text in expected:
    assert text in str(error.value)
  # Nothing is left that looks like a dataset.
  assert not build.get_builder(name, records).is_prepared()
  written = [f for _, _, files in os.walk(records) for f in files]
  assert not [f for f in written if '.tfrecord' in f or f == 'dataset_info.json'], written

  builder = build.build(name, records, manual_dir=str(manual), skip_bad_examples=True)
  assert len(builder.skipped) == num_skipped
  total = lambda b: sum(s.num_examples for s in b.info.splits.values())
  dropped_pairs = 0 if case == 'category not in the list' else num_skipped  # that one drops an instance
  assert total(builder) == total(build.get_builder(name, data_dir)) - dropped_pairs
  with open(os.path.join(builder.data_dir, build.SKIP_LOG)) as f:
    log = f.read().splitlines()
  assert log[0] == 'split\tkey\treason' and len(log) == 1 + num_skipped
  assert expected[0] in log[1]


def test_build_command_then_tfds_load_in_a_fresh_process(tmp_path):
  manual = tmp_path / 'manual'
  shutil.copytree(_dummy('misc210k'), manual)
  _missing_image(str(manual))
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                                     text=True, timeout=300, check=False)
  built = run('-m', 'tfds_builders.build', 'misc210k', f'--manual_dir={manual}',
              f'--data_dir={tmp_path}', '--skip_bad_examples', '--max_shard_size=20000')
  assert built.returncode == 0, built.stderr[-2000:]
  assert 'Skipped 2 bad examples' in built.stderr
  loaded = run('-c', 'import sys, tensorflow_datasets as tfds; '
               f'print(len(tfds.load("misc210k", split="train", data_dir={str(tmp_path)!r})))')
  assert loaded.returncode == 0, loaded.stderr[-2000:]
  assert loaded.stdout.split()[-1] == '6'
  shards = [f for f in os.listdir(tmp_path / 'misc210k' / '1.1.0') if '-train.tfrecord' in f]
  assert len(shards) > 1  # --max_shard_size takes effect


@pytest.fixture(scope='module')
def random_model():
  """KBCNet-tiny at initialisation (the smoke config, 52 keypoint slots), on the all-`batch` mesh."""
  config = synthetic.get_config('smoke')
  config.input.max_keypoints = 52
  model_module, model = state_lib.create_model(config)
  return config, model_module, state_lib.initial_state(config, model)


@pytest.mark.parametrize('name', DATASETS)
def test_a_random_model_evaluates_on_every_dataset(name, data_dir, random_model):
  config, model_module, state = random_model
  config = config.copy_and_resolve_references()
  config.dataset.name = name
  config.dataset.data_dir = data_dir
  config.eval.threshold = 'image' if name.startswith('pf_pascal') else 'bbox'
  builder = build.get_builder(name, data_dir)
  evaluator = pck_evaluator.Evaluator(config, model_module, 'test',
                                      builder.info.features['category'].names, sharding.make_mesh(config))
  metrics, _ = evaluator.evaluate(state)
  assert metrics['num_pairs'] == builder.info.splits['test'].num_examples
  assert 0 <= metrics['pck@0.05'] <= metrics['pck@0.1'] <= metrics['pck@0.15'] <= 1
  if name == 'spair71k':
    truncation = metrics['per_attribute']['truncation']
    assert {level: v['num_pairs'] for level, v in truncation.items()} == {'0': 1, '3': 1}


def test_a_build_short_of_the_official_pair_counts_says_by_how_much(data_dir):
  lines = build.shortfall(build.get_builder('spair71k', data_dir))
  assert 'spair71k/large/1.0.0 test: 2 pairs, 12,232 short of the official 12,234' in lines
  assert len(lines) == 3
  assert build.shortfall(build.get_builder('pf_willow', data_dir)) == [
      'pf_willow/1.0.0 test: 3 pairs, 897 short of the official 900']
  assert build.shortfall(build.get_builder('misc210k', data_dir)) == []  # no official counts exist


def test_pf_pascal_chm_validation_and_test_files_have_no_flip_column(data_dir):
  """As in the release, only trn_pairs.csv has `flip`; val and test carry XA, YA, XB, YB instead, which
  this flavour ignores (keypoints come from the .mat files)."""
  with open(os.path.join(_dummy('pf_pascal'), 'val_pairs.csv')) as f:
    assert f.readline().strip() == 'source_image,target_image,class,XA,YA,XB,YB'
  pair = _pairs('pf_pascal/chm', data_dir, 'validation')['00000-2007_000003-2007_000001']
  np.testing.assert_array_equal(pair['source']['keypoints'][0, [0, 1, 3]], [[3, 4], [8, 9], [25, 35]])
  np.testing.assert_array_equal(pair['source']['keypoint_visible'][0, :4], [1, 1, 0, 1])  # 2: NaN in 1
  np.testing.assert_array_equal(pair['target']['keypoints'][0, 0], [5, 6])  # not mirrored


def _reorder_columns(path, order):
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  index = [rows[0].index(name) for name in order]
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows([[row[i] for i in index] for row in rows])


def test_csv_files_are_read_by_their_column_names(data_dir, tmp_path):
  for name, files in (('pf_pascal/chm', ('trn_pairs.csv', 'test_pairs.csv')),
                      ('pf_willow', ('test_pairs.csv',))):
    manual = tmp_path / name.split('/')[0]
    shutil.copytree(_dummy(name), manual)
    for csv_name in files:
      with open(manual / csv_name) as f:
        header = f.readline().strip().split(',')
      _reorder_columns(manual / csv_name, header[::-1])  # every column moved
    records = str(tmp_path / 'records')
    build.build(name, records, manual_dir=str(manual))
    for split in build.get_builder(name, records).info.splits:
      ours, original = _pairs(name, records, split), _pairs(name, data_dir, split)
      assert set(ours) == set(original), name
      for key in ours:
        for side in ('source', 'target'):
          np.testing.assert_array_equal(ours[key][side]['keypoints'], original[key][side]['keypoints'])
  _reorder_columns(manual / 'test_pairs.csv', [c for c in header if c != 'YB7'])
  with pytest.raises(features.InvalidExampleError, match='test_pairs.csv: field YB7: no such column'):
    build.build('pf_willow', str(tmp_path / 'other'), manual_dir=str(manual))


def test_a_small_misc210k_builds_without_the_validation_split_it_cannot_fill(tmp_path, caplog):
  """A user's subset (or a fixture) whose training images give the derived validation split no pair: the
  build leaves that split out with a warning saying how many images it held, instead of failing."""
  manual = tmp_path / 'manual'
  shutil.copytree(_dummy('misc210k'), manual)
  _rewrite_json(os.path.join(manual, MISC_TRAIN),  # drop image 124, so validation holds image 20 alone
                lambda d: d.update(images=[i for i in d['images'] if i['id'] != 124],
                                   annotations=[a for a in d['annotations'] if a['image_id'] != 124]))
  builder = build.build('misc210k', str(tmp_path / 'records'), manual_dir=str(manual))
  assert set(builder.info.splits) == {'train', 'test'}
  assert 'misc210k/validation: 1 images but no pair' in caplog.text
  config = synthetic.get_config('smoke')
  config.dataset.update(name='misc210k', data_dir=str(tmp_path / 'records'))
  with pytest.raises(ValueError, match=r"misc210k has no split 'validation' \(config.dataset.eval_split\); "
                                       r"it has \['test', 'train'\]"):
    train.resolve_schedule(config, builder)
