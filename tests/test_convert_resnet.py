"""misc_jax.tools.convert_resnet: torchvision checkpoints -> a backbone KBCNet starts from."""

import flax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from test_resnet import formula_state_dict  # pylint: disable=g-bad-import-order

from misc_jax import state as state_lib
from misc_jax.tools import convert_resnet


@pytest.fixture(scope='module')
def state_dict():
  return formula_state_dict()


def _save(state, path):
  if path.suffix == '.npz':
    np.savez(path, **state)
  elif path.suffix == '.safetensors':
    safetensors_numpy.save_file(state, str(path))
  else:
    torch = pytest.importorskip('torch')
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  return str(path)


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors', '.pth'])
def test_every_input_format_gives_the_same_backbone(state_dict, tmp_path, suffix):
  out = tmp_path / 'r101.msgpack'
  convert_resnet.convert(_save(state_dict, tmp_path / f'r101{suffix}'), str(out))
  restored = flax.serialization.msgpack_restore(out.read_bytes())
  conv = restored['params']['layer3_5']['conv2']['kernel']
  np.testing.assert_array_equal(conv, state_dict['layer3.5.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(restored['batch_stats']['layer4_2']['bn3']['var'],
                                state_dict['layer4.2.bn3.running_var'])
  assert 'fc' not in restored['params']


def test_kbcnet_r101_starts_from_the_converted_backbone(state_dict, smoke_config, tmp_path):
  out = str(tmp_path / 'r101.msgpack')
  convert_resnet.convert(_save(state_dict, tmp_path / 'r101.npz'), out)
  config = smoke_config
  with config.unlocked():
    config.model.update(state_lib.create_model(config)[0].decode_variant('kbcnet_r101'))
    config.model.backbone_init = out
    config.input.image_size = 32
  state = state_lib.initial_state(config, state_lib.create_model(config)[1])
  np.testing.assert_array_equal(state.params['backbone']['conv1']['kernel'],
                                state_dict['conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.batch_stats['backbone']['layer3_22']['bn2']['mean'],
                                state_dict['layer3.22.bn2.running_mean'])
  assert 'csfa' in state.params  # the rest is freshly initialised


def test_a_backbone_that_does_not_fit_is_refused(state_dict, smoke_config, tmp_path):
  out = str(tmp_path / 'r101.msgpack')
  convert_resnet.convert(_save(state_dict, tmp_path / 'r101.npz'), out)
  with smoke_config.unlocked():
    smoke_config.model.backbone_init = out  # kbcnet_tiny: width 16, one block per stage
  with pytest.raises(ValueError, match='r101.msgpack: params of the backbone do not fit the model'):
    state_lib.initial_state(smoke_config, state_lib.create_model(smoke_config)[1])


def test_bad_inputs_are_named(tmp_path):
  np.savez(tmp_path / 'other.npz', weight=np.zeros(3))
  with pytest.raises(ValueError, match='other.npz: not a torchvision ResNet state_dict'):
    convert_resnet.convert(str(tmp_path / 'other.npz'), str(tmp_path / 'out.msgpack'))
  with pytest.raises(ValueError, match="unknown checkpoint type '.ckpt'"):
    convert_resnet.load_state_dict(str(tmp_path / 'model.ckpt'))

