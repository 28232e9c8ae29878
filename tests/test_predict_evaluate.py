"""Inference on a user's images (misc_jax.predict) and evaluation of a checkpoint (misc_jax.evaluate)."""

import json
import os
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from misc_jax import evaluate
from misc_jax import predict


@pytest.fixture
def run_dir(trained_run):
  """A 6-step smoke run on synthetic_misc/tiny, as misc_jax.main leaves it (conftest.py)."""
  return trained_run[0]


def test_evaluate_reproduces_the_in_training_evaluation(run_dir, tiny_data_dir, tmp_path):
  in_training = json.loads((run_dir / 'eval' / 'validation_00000006.json').read_text())
  report = evaluate.evaluate(str(run_dir), split='validation', data_dir=tiny_data_dir,
                             overrides={'eval.plot_alpha': 0.15}, plot=str(tmp_path / 'first.png'))
  assert (tmp_path / 'first.png').stat().st_size > 10_000
  assert report['step'] == 6 and report['threshold'] == 'bbox'
  for key in ('pck@0.05', 'pck@0.1', 'pck@0.15', 'pck_keypoint@0.1', 'num_pairs'):
    assert report[key] == pytest.approx(in_training[key], abs=1e-9), key
  assert report['per_category'] == in_training['per_category']
  assert '| category | pairs |' in evaluate.category_table(report)


def test_evaluate_takes_a_slice_of_a_split(run_dir, tiny_data_dir):
  whole = evaluate.evaluate(str(run_dir), split='validation', data_dir=tiny_data_dir)
  assert whole['num_pairs'] == 3
  first_two = evaluate.evaluate(str(run_dir), split='validation[:2]', data_dir=tiny_data_dir)
  assert first_two['num_pairs'] == 2 and first_two['split'] == 'validation[:2]'
  assert evaluate.report_name(first_two) == 'synthetic_misc_tiny_validation_2_step6.json'


def test_config_overrides_parse_literals():
  assert evaluate.parse_override('eval.alphas=(0.1, 0.2)') == ('eval.alphas', (0.1, 0.2))
  assert evaluate.parse_override('dataset.name=pf_willow') == ('dataset.name', 'pf_willow')


def test_evaluate_names_what_is_missing(run_dir, tiny_data_dir, tmp_path):
  for bad in ('bogus', 'validation[:abc]'):
    with pytest.raises(ValueError, match=re.escape(f"no split {bad!r}")):
      evaluate.evaluate(str(run_dir), split=bad, data_dir=tiny_data_dir)
  with pytest.raises(FileNotFoundError, match='is not built'):
    evaluate.evaluate(str(run_dir), dataset='synthetic_misc/small_objects', data_dir=str(tmp_path))


@pytest.fixture(scope='module')
def images(tiny_data_dir, tmp_path_factory):
  """The two images of a synthetic test pair as PNG files, and the source instance's keypoints."""
  pair = next(iter(tfds.as_numpy(tfds.load('synthetic_misc/tiny', split='test',
                                           data_dir=tiny_data_dir))))
  folder = tmp_path_factory.mktemp('images')
  paths = []
  for side in ('source', 'target'):
    paths.append(str(folder / f'{side}.png'))
    Image.fromarray(pair[side]['image']).save(paths[-1])
  visible = pair['source']['keypoint_visible'][0]
  return paths, pair['source']['keypoints'][0][visible]


@pytest.fixture(scope='module')
def predictor(trained_run):
  return predict.Predictor.load(str(trained_run[0]))


def test_predict_writes_keypoints_and_a_picture(predictor, images, tmp_path):
  (source, target), kps = images
  pred = predictor(source, target, kps, use_kbc=True)
  width, height = Image.open(target).size
  assert pred.shape == kps.shape and np.isfinite(pred).all()
  assert (pred >= 0).all() and (pred[:, 0] <= width).all() and (pred[:, 1] <= height).all()
  output = str(tmp_path / 'out' / 'pair.json')
  predict.save(source, target, kps, pred, output)
  written = json.loads(open(output).read())
  assert np.asarray(written['target_keypoints']).shape == kps.shape
  assert os.path.getsize(tmp_path / 'out' / 'pair.png') > 5_000

  # Batch mode: a CSV with keypoints in one row and a box in the other.
  with open(tmp_path / 'kps.json', 'w') as f:
    json.dump({'keypoints': kps.tolist()}, f)
  for name in ('source.png', 'target.png'):
    os.symlink(source if name == 'source.png' else target, tmp_path / name)
  (tmp_path / 'pairs.csv').write_text('source,target,keypoints,bbox\n'
                                       'source.png,target.png,kps.json,\n'
                                       'source.png,target.png,,"4,4,40,30"\n')
  predict.predict_pairs(predictor, str(tmp_path / 'pairs.csv'), str(tmp_path / 'batch'), grid=3,
                        use_kbc=True)
  second = json.loads((tmp_path / 'batch' / '00001.json').read_text())
  assert np.asarray(second['target_keypoints']).shape == (9, 2)
  assert (tmp_path / 'batch' / '00000.png').exists()


def test_predict_bad_inputs_are_named(run_dir, predictor, images, tmp_path):
  (source, target), kps = images
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'config.json').write_text((run_dir / 'config.json').read_text())
    predict.Predictor.load(str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='not a misc_jax workdir'):
    predict.Predictor.load(str(tmp_path))
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(ValueError, match='broken.jpg: cannot decode'):
    predictor(str(broken), target, kps)
  with pytest.raises(ValueError, match=r'source keypoint 1 \[500.0, 3.0\] lies outside'):
    predictor(source, target, [[1, 1], [500, 3]])
  with pytest.raises(ValueError, match='x2 > x1'):
    predict.grid_in_box(['10', '10', '5', '20'], 3)
  # A checkpoint from another model: the config says wider layers than the checkpoint holds.
  config = json.loads((run_dir / 'config.json').read_text())
  config['model']['csfa_dim'] *= 2
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps(config))
  os.symlink(run_dir / 'checkpoints', other / 'checkpoints')
  with pytest.raises(ValueError, match='does not fit the model'):
    predict.Predictor.load(str(other))
