"""Inference on a user's images (misc_jax.predict) and evaluation of a checkpoint (misc_jax.evaluate)."""

import json
import os
import re
import subprocess
import sys

from absl import flags
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from misc_jax import cli
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
  with pytest.raises(FileNotFoundError, match='is not built') as error:
    evaluate.evaluate(str(run_dir), dataset='synthetic_misc/small_objects', data_dir=str(tmp_path))
  assert str(error.value).endswith('build it with: python -m tfds_builders.build synthetic_misc/small_objects '
                                   f'--data_dir {tmp_path}')  # no --manual_dir: nothing to download by hand


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
  requests = predict.read_pairs_csv(str(tmp_path / 'pairs.csv'), grid=3, size=64, full=160)
  predict.predict_pairs(predictor, requests, str(tmp_path / 'batch'), use_kbc=True)
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


def test_evaluate_refuses_unknown_fields_and_names_reports_by_their_options(run_dir, tiny_data_dir):
  with pytest.raises(ValueError, match="--set model.nosuch: config.model has no field 'nosuch'; its fields:"):
    evaluate.evaluate(str(run_dir), split='validation', data_dir=tiny_data_dir,
                      overrides={'model.nosuch': 1})
  with pytest.raises(ValueError, match="config has no field 'modle'"):
    evaluate.evaluate(str(run_dir), split='validation', data_dir=tiny_data_dir,
                      overrides={'modle.beta': 1})
  plain = evaluate.evaluate(str(run_dir), split='validation[:1]', data_dir=tiny_data_dir)
  other = evaluate.evaluate(str(run_dir), split='validation[:1]', data_dir=tiny_data_dir, kbc=True,
                            threshold='image', overrides={'model.sigma': 2.0})
  assert other['options'] == {'kbc': True, 'threshold': 'image', 'model.sigma': 2.0}
  names = {evaluate.report_name(plain), evaluate.report_name(other)}
  assert names == {'synthetic_misc_tiny_validation_1_step6.json',
                   'synthetic_misc_tiny_validation_1_step6_kbc=True_model.sigma=2.0_threshold=image.json'}


def test_unknown_names_are_refused_with_the_valid_choices(run_dir):
  from tfds_builders import build  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unknown dataset 'spair'; the datasets are misc210k, pf_pascal"):
    build.get_builder('spair')
  with pytest.raises(ValueError, match="synthetic_misc has no config 'huge'; its configs are default, large, "
                                       "small_objects, tiny"):
    build.get_builder('synthetic_misc/huge')
  with pytest.raises(ValueError, match="checkpoint 'bset': expected \"latest\", \"best\" or a step number"):
    predict.Predictor.load(str(run_dir), 'bset')


def test_predictions_stay_inside_the_target_image():
  """A volume whose read-out extrapolates past the last cell (source cell 14 maps to target cell 10,
  cell 15 to 15): a keypoint at the right border would land 15 px outside the 128 px image."""
  from misc_jax.models import kbcnet  # pylint: disable=g-import-not-at-top
  from misc_jax.ops import grid as grids  # pylint: disable=g-import-not-at-top
  grid, size = 16, 128
  target_cell = np.arange(grid)
  target_cell[14] = 10
  scores = np.zeros((1, grid, grid, grid, grid), np.float32)  # [B, Ha, Wa, Hb, Wb]
  for y in range(grid):
    for x in range(grid):
      scores[0, y, x, y, target_cell[x]] = 1.
  kps = np.array([[[127.9, 60.], [64., 64.]]], np.float32)
  pred = kbcnet.predict_keypoints(scores.reshape(1, grid * grid, grid, grid), kps, np.ones((1, 2), bool),
                                  size, grid=grids.resnet(8), beta=1e-3)
  assert (pred >= 0).all() and (pred <= size).all()
  np.testing.assert_allclose(pred[0, 0, 0], size)  # clamped at the border, not dropped
  np.testing.assert_allclose(pred[0, 1], [64., 64.], atol=1e-3)


def test_sixteen_bit_and_exif_rotated_images_are_read_as_displayed(tmp_path):
  grey = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (20, 1))  # a left-to-right ramp
  Image.fromarray(grey).save(tmp_path / 'ramp16.png')
  pixels = predict.read_image(str(tmp_path / 'ramp16.png'))
  assert pixels.shape == (20, 40, 3) and pixels.dtype == np.uint8
  np.testing.assert_allclose(pixels[0, :, 0], np.linspace(0, 255, 40), atol=1)  # scaled, not clipped
  # A phone photo stored landscape (40 x 20, red on the left) with EXIF orientation 6 (rotate 90 CW).
  stored = np.zeros((20, 40, 3), np.uint8)
  stored[:, :10] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / 'phone.jpg', exif=exif, quality=95)
  pixels = predict.read_image(str(tmp_path / 'phone.jpg'))
  assert pixels.shape == (40, 20, 3)  # upright: portrait
  assert pixels[:10, :, 0].mean() > 200 and pixels[30:, :, 0].mean() < 60  # the red strip is on top
  resized, hw = predict.load_image(str(tmp_path / 'phone.jpg'), 64)
  assert resized.shape == (64, 64, 3) and hw == (40, 20)


def test_keypoint_and_box_inputs_are_checked_with_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='bbox 10,20,90: expected 4 numbers x1,y1,x2,y2, got 3'):
    predict.grid_in_box(['10', '20', '90'], 3)
  with pytest.raises(ValueError, match='bbox 10,a,90,30: expected 4 numbers'):
    predict.grid_in_box(['10', 'a', '90', '30'], 3)
  (tmp_path / 'key.json').write_text('{"points": [[1, 2]]}')
  with pytest.raises(ValueError, match=r"key.json: expected .* the object has the keys \['points'\]"):
    predict.read_keypoints(str(tmp_path / 'key.json'))
  (tmp_path / 'strings.json').write_text('{"keypoints": [["1", "x"]]}')
  with pytest.raises(ValueError, match='strings.json: keypoints must be numbers'):
    predict.read_keypoints(str(tmp_path / 'strings.json'))
  (tmp_path / 'booleans.json').write_text('[[true, 100]]')  # not x = 1
  with pytest.raises(ValueError, match=re.escape('booleans.json: keypoints must be numbers, [[x, y], ...]; '
                                                 'got [[true, 100]]')):
    predict.read_keypoints(str(tmp_path / 'booleans.json'))


def test_predict_checks_its_inputs_before_loading_the_model(run_dir, images, tmp_path):
  """A run folder with config.json but no checkpoint: a bad input must be reported, not the missing
  checkpoint, so the inputs were read before the model."""
  (source, target), _ = images
  no_model = tmp_path / 'no_model'
  no_model.mkdir()
  (no_model / 'config.json').write_text((run_dir / 'config.json').read_text())
  (tmp_path / 'kps.json').write_text('[[1, 2], [900, 3]]')
  result = subprocess.run(
      [sys.executable, '-m', 'misc_jax.predict', f'--workdir={no_model}', f'--source={source}',
       f'--target={target}', f'--keypoints={tmp_path / "kps.json"}'],
      capture_output=True, text=True, timeout=300, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0
  assert 'source keypoint 1 [900.0, 3.0] lies outside' in result.stderr, result.stderr[-2000:]
  assert 'no checkpoint' not in result.stderr


def test_kbc_sweep_tabulates_every_setting_with_kbc_off_first(run_dir, tiny_data_dir):
  from misc_jax.tools import sweep_kbc  # pylint: disable=g-import-not-at-top
  rows = sweep_kbc.sweep(str(run_dir), 'validation', {'coarse_radius': [0.5], 'passes': [1, 2]},
                         data_dir=tiny_data_dir)
  assert [r['kbc'] for r in rows] == [False, {'coarse_radius': 0.5, 'passes': 1},
                                      {'coarse_radius': 0.5, 'passes': 2}]
  assert all(r['num_pairs'] == 3 and 0 <= r['pck@0.1'] <= 1 for r in rows)
  table = sweep_kbc.table(rows).splitlines()
  assert table[0].startswith('| max_scale | coarse_radius | passes | fill | margin | small_threshold |')
  assert table[2].startswith('| KBC off |') and len(table) == 5
  assert {line.split(' | ')[2] for line in table[3:]} == {'1', '2'}  # the passes column


def _console_script(name, *args, env=None, cwd=None):
  return subprocess.run([os.path.join(os.path.dirname(sys.executable), name), *args], capture_output=True,
                        text=True, timeout=300, check=False, env=env, cwd=cwd)


@pytest.mark.parametrize('name,module', [('misc-jax-evaluate', evaluate), ('misc-jax-predict', predict)])
def test_console_scripts_help_shows_the_description_and_the_flags(name, module):
  result = _console_script(name, '--help')
  shown = result.stdout + result.stderr
  assert module.__doc__.splitlines()[0] in shown, shown[-2000:]
  assert '--workdir: ' in shown and '--checkpoint: ' in shown and '--output: ' in shown


def test_every_path_flag_expands_home_and_variables(run_dir, tiny_data_dir, tmp_path, monkeypatch):
  """A quoted '$RUN' or '~/...' reaches the program as typed: the reads and the writes both go where the
  shell would have sent them (not to a folder named '$RUN' or '~')."""
  values = flags.FlagValues()
  cli.DEFINE_path('some_path', None, 'A path.', flag_values=values)
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv('WHERE', 'runs')
  values(['prog', '--some_path=~/$WHERE/x.json'])
  assert values.some_path == f'{tmp_path}/runs/x.json'
  env = dict(os.environ, RUN=str(run_dir), HOME=str(tmp_path), TFDS=tiny_data_dir)
  result = _console_script('misc-jax-evaluate', '--workdir=$RUN', '--data_dir=$TFDS', '--split=validation',
                           '--output=~/report.json', env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((tmp_path / 'report.json').read_text())['step'] == 6
  assert not (tmp_path / '~').exists() and not (tmp_path / '$RUN').exists()
