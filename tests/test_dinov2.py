"""The Flax DINOv2 against the official code (shared/golden section 11: formula-defined weights through the
converter), its pieces against plain references, and DINOv2 as KBCNet's backbone."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import golden_weights
from misc_jax import state as state_lib
from misc_jax.models import dinov2

GOLDEN = golden_weights.GOLDEN
formula_state_dict = golden_weights.dinov2  # section 11 of shared/golden/README.md
_as_transformers = golden_weights.as_transformers
_as_timm = golden_weights.as_timm


@pytest.mark.parametrize('case', ['vits14', 'vits14_reg'])
def test_matches_the_official_dinov2(case):
  """Position embedding resized with torch's rules (scale-factor offset / antialiased size), registers
  between cls and patches, every block: within the golden file's tolerances."""
  golden = np.load(os.path.join(GOLDEN, f'dinov2_{case}.npz'))
  blocks = tuple(int(i) for i in golden['block_indices'])
  model = dinov2.DinoV2(**dinov2.architecture(case), out_blocks=blocks)
  variables = dinov2.official_to_flax(formula_state_dict(case), case)
  out = jax.jit(model.apply)(variables, golden['image_nchw'].transpose(0, 2, 3, 1))
  registers = model.registers
  np.testing.assert_allclose(out['norm'][:, 0], golden['x_norm_clstoken'], atol=1e-4)
  np.testing.assert_allclose(out['norm'][:, 1:1 + registers], golden['x_norm_regtokens'], atol=1e-4)
  np.testing.assert_allclose(out['norm'][:, 1 + registers:], golden['x_norm_patchtokens'], atol=1e-4)
  np.testing.assert_allclose(out['prenorm'], golden['x_prenorm'], rtol=1e-4, atol=1e-4)
  for i in blocks:
    np.testing.assert_allclose(out['raw_blocks'][i], golden[f'block{i}_output'], rtol=1e-4, atol=1e-4,
                               err_msg=f'block {i}')


def test_swiglu_matches_a_numpy_reference():
  """ViT-g's feed-forward: w3(silu(x1) * x2) with [x1, x2] = w12(x), hidden (int(8 D / 3) + 7) // 8 * 8."""
  d = 24
  ffn = dinov2.SwiGLU()
  x = np.random.default_rng(0).normal(size=(2, 5, d)).astype(np.float32)
  params = ffn.init(jax.random.key(1), x)['params']
  hidden = (int(4 * d * 2 / 3) + 7) // 8 * 8
  assert params['w12']['kernel'].shape == (d, 2 * hidden) and params['w3']['kernel'].shape == (hidden, d)
  h = x @ params['w12']['kernel'] + params['w12']['bias']
  x1, x2 = h[..., :hidden], h[..., hidden:]
  want = (x1 / (1 + np.exp(-x1)) * x2) @ params['w3']['kernel'] + params['w3']['bias']
  np.testing.assert_allclose(ffn.apply({'params': params}, x), want, rtol=1e-5, atol=1e-5)


def test_the_518_px_grid_keeps_its_position_embedding():
  pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1 + 37 * 37, 8)), jnp.float32)
  np.testing.assert_array_equal(dinov2.resize_position_embedding(pos, 37, 37, 0.1, False), pos)
  assert dinov2.resize_position_embedding(pos, 9, 7, 0.1, False).shape == (1, 1 + 63, 8)


@pytest.mark.parametrize('name,expected', [('vitb14', (768, 12, 12, 'mlp', 0)),
                                           ('vitg14_reg', (1536, 40, 24, 'swiglu', 4))])
def test_architectures_follow_the_hub_models(name, expected):
  a = dinov2.architecture(name)
  assert (a['dim'], a['depth'], a['heads'], a['ffn'], a['registers']) == expected
  with pytest.raises(ValueError, match="unknown DINOv2 model 'vith14'"):
    dinov2.architecture('vith14')


def test_the_converter_reads_the_architecture_and_refuses_what_does_not_fit(tmp_path):
  from misc_jax.tools import convert_dinov2  # pylint: disable=g-import-not-at-top
  state = formula_state_dict('vits14_reg')
  np.savez(tmp_path / 'reg.npz', **state)
  variables = convert_dinov2.convert(str(tmp_path / 'reg.npz'), str(tmp_path / 'reg.msgpack'))
  np.testing.assert_array_equal(variables['params']['blocks_3']['attn']['qkv']['kernel'],
                                state['blocks.3.attn.qkv.weight'].T)
  assert convert_dinov2.model_name(state) == 'vits14_reg'
  bad = dict(state, **{'blocks.2.mlp.fc1.weight': np.zeros((100, 384), np.float32)})
  with pytest.raises(ValueError, match=r"'blocks.2.mlp.fc1.weight' has shape \(384, 100\), the model "
                                       r"expects \(384, 1536\)"):
    dinov2.official_to_flax(bad, 'vits14_reg')
  extra = dict(state, **{'head.weight': np.zeros((10, 384), np.float32)})
  with pytest.raises(ValueError, match="checkpoint key 'head.weight'"):
    dinov2.official_to_flax(extra, 'vits14_reg')
  missing = {k: v for k, v in state.items() if not k.startswith('blocks.11.')}
  with pytest.raises(ValueError, match=r"the checkpoint lacks 14 arrays, e.g. \['blocks.11.attn.proj.bias'"):
    dinov2.official_to_flax(missing, 'vits14_reg')
  np.savez(tmp_path / 'resnet.npz', **{'conv1.weight': np.zeros((64, 3, 7, 7), np.float32)})
  with pytest.raises(ValueError, match='resnet.npz: not a DINOv2 state_dict'):
    convert_dinov2.convert(str(tmp_path / 'resnet.npz'), str(tmp_path / 'out.msgpack'))


@pytest.mark.parametrize('case', ['vits14', 'vits14_reg'])
def test_official_transformers_and_timm_files_convert_to_the_same_model(case, tmp_path):
  """Formula weights written in the three layouts (an .npz, a Hugging Face snapshot directory, a timm
  .safetensors) convert to models whose outputs are the official golden's; the layout is detected."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  from misc_jax.tools import convert_dinov2  # pylint: disable=g-import-not-at-top
  official = formula_state_dict(case)
  snapshot = tmp_path / 'hf'
  snapshot.mkdir()
  (snapshot / 'config.json').write_text(json.dumps({'model_type': 'dinov2'}))
  safetensors_numpy.save_file(_as_transformers(official), str(snapshot / 'model.safetensors'))
  safetensors_numpy.save_file(_as_timm(official), str(tmp_path / 'timm.safetensors'))
  np.savez(tmp_path / 'official.npz', **official)
  golden = np.load(os.path.join(GOLDEN, f'dinov2_{case}.npz'))
  model = dinov2.DinoV2(**dinov2.architecture(case))
  image = golden['image_nchw'].transpose(0, 2, 3, 1)
  reference = dinov2.official_to_flax(official, case)
  for kind, path in (('official', tmp_path / 'official.npz'), ('transformers', snapshot),
                     ('timm', tmp_path / 'timm.safetensors')):
    assert convert_dinov2.to_official(convert_dinov2.read(str(path)))[0] == kind
    variables = convert_dinov2.convert(str(path), str(tmp_path / f'{kind}.msgpack'))
    if kind == 'transformers':  # the same arrays, renamed
      jax.tree.map(np.testing.assert_array_equal, variables, reference)
    out = jax.jit(model.apply)(variables, image)
    np.testing.assert_allclose(out['norm'][:, 1 + model.registers:], golden['x_norm_patchtokens'], atol=1e-4,
                               err_msg=kind)
    np.testing.assert_allclose(out['norm'][:, 0], golden['x_norm_clstoken'], atol=1e-4, err_msg=kind)


@pytest.mark.parametrize('library', ['transformers', 'timm'])
@pytest.mark.parametrize('case', ['vits14', 'vits14_reg'])
def test_converted_library_weights_match_the_librarys_own_forward_pass(case, library):
  """Goldens of `transformers` 5.25 and timm 1.0.31 (tests/testdata/golden/make_dinov2_library_goldens.py)
  on the formula weights in their own layouts. At 518 px (no resizing) the converted model gives their
  tokens within 1e-4. At 392 x 518 the models with registers still do; without registers both libraries
  resize the position embedding otherwise than the official code, which ours follows (docs/backbones.md):
  their tokens differ from the official ones by more than 0.05 there."""
  from misc_jax.tools import convert_dinov2  # pylint: disable=g-import-not-at-top
  write = {'transformers': _as_transformers, 'timm': _as_timm}[library]
  _, state = convert_dinov2.to_official(write(formula_state_dict(case)))
  variables = dinov2.official_to_flax(state, case)
  golden = np.load(os.path.join(GOLDEN, f'dinov2_{case}_{library}.npz'))
  model = dinov2.DinoV2(**dinov2.architecture(case))
  first = 1 + model.registers
  for h, w in ((518, 518), (392, 518)):
    image = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32).transpose(0, 2, 3, 1)
    out = np.asarray(jax.jit(model.apply)(variables, image)['norm'])
    patches = out[:, first:][:, golden[f'patch_index_{h}x{w}']]
    if (h, w) == (518, 518) or model.registers:
      np.testing.assert_allclose(out[:, :first], golden[f'prefix_{h}x{w}'], atol=1e-4)
      np.testing.assert_allclose(patches, golden[f'patches_{h}x{w}'], atol=1e-4)
      np.testing.assert_allclose(out[:, first:].astype(np.float64).sum(1), golden[f'patch_sum_{h}x{w}'],
                                 atol=1e-3)
    else:
      assert np.abs(patches - golden[f'patches_{h}x{w}']).max() > 0.05


def test_layouts_that_do_not_fit_are_refused_naming_a_key(tmp_path):
  from misc_jax.tools import convert_dinov2  # pylint: disable=g-import-not-at-top
  hf = _as_transformers(formula_state_dict('vits14'))
  with pytest.raises(ValueError, match="transformers layout: the key 'pooler.dense.weight'"):
    convert_dinov2.to_official(dict(hf, **{'pooler.dense.weight': np.zeros((2, 2), np.float32)}))
  del hf['encoder.layer.3.attention.attention.key.bias']
  with pytest.raises(ValueError, match=r"block 3 has the attention bias of \['query', 'value'\]"):
    convert_dinov2.to_official(hf)
  giant = {'cls_token': np.zeros((1, 1, 1536)), 'pos_embed': np.zeros((1, 1370, 1536)),
           'patch_embed.proj.weight': np.zeros((1536, 3, 14, 14)),
           'blocks.0.mlp.fc1.weight': np.zeros((8192, 1536)),
           'blocks.0.mlp.fc2.weight': np.zeros((1536, 4096))}
  kind, state = convert_dinov2.to_official(giant)  # timm's packed SwiGLU: fc1 / fc2 are w12 / w3
  assert kind == 'timm' and {'blocks.0.mlp.w12.weight', 'blocks.0.mlp.w3.weight'} <= set(state)
  hf_giant = {'embeddings.patch_embeddings.projection.weight': giant['patch_embed.proj.weight'],
              'embeddings.cls_token': giant['cls_token'], 'encoder.layer.0.mlp.weights_in.weight': giant[
                  'blocks.0.mlp.fc1.weight'], 'encoder.layer.0.mlp.weights_out.bias': np.zeros(1536)}
  kind, state = convert_dinov2.to_official(hf_giant)  # transformers' SwiGLU: weights_in / weights_out
  assert kind == 'transformers' and {'blocks.0.mlp.w12.weight', 'blocks.0.mlp.w3.bias'} <= set(state)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='a Hugging Face snapshot holding config.json and model.safetensors'):
    convert_dinov2.read(str(tmp_path / 'empty'))


def _grads_and_checkpoints(model, params, inputs, method=None):
  """The gradient of a loss of the model's outputs, and how many jax.checkpoint regions its forward pass
  has."""
  loss = lambda p: sum(jnp.mean(jnp.sin(y)) for y in jax.tree.leaves(
      model.apply({'params': p}, *inputs, method=method)))
  regions = re.findall(r'= (?:remat2|checkpoint)\[', str(jax.make_jaxpr(loss)(params)))
  return jax.jit(jax.grad(loss))(params), len(regions)


def test_remat_recomputes_the_blocks_and_keeps_the_gradients():
  """config.model.remat: every ViT block, and every decoder block, is a jax.checkpoint; same gradients."""
  from misc_jax.ops import conv4d  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 3)), jnp.float32)
  vit = dict(dim=32, depth=3, heads=2, out_blocks=(1, 2))
  volume = jnp.asarray(np.random.default_rng(1).normal(size=(1, 6, 6, 6, 6, 3)), jnp.float32)
  stack = dict(features=(8, 8), kernel_sizes=(3, 3), strides=(2, 1), stride_dims='source')
  cases = ((lambda remat: dinov2.DinoV2(**vit, remat=remat), (images,), 'features', 3),
           (lambda remat: conv4d.CenterPivotStack(**stack, remat=remat), (volume,), None, 2))
  for make, inputs, method, blocks in cases:
    params = make(False).init(jax.random.key(0), *inputs)['params']
    (plain, none), (remat, regions) = (_grads_and_checkpoints(make(r), params, inputs, method)
                                       for r in (False, True))
    assert (none, regions) == (0, blocks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7), plain, remat)


def test_scanned_blocks_compute_what_the_unrolled_blocks_do(tmp_path):
  """config.model.scan_blocks: one nn.scan over stacked block params (with and without remat) gives the
  unrolled model's features and gradients; converted weights load into either layout and round-trip."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 3)), jnp.float32)
  vit = dict(dim=32, depth=3, heads=2, out_blocks=(0, 2))
  unrolled = dinov2.DinoV2(**vit).init(jax.random.key(0), images)
  scan_config = ml_collections.ConfigDict({'scan_blocks': True})
  stacked = dinov2.weights_layout(unrolled, scan_config)
  assert 'blocks_0' not in stacked['params']
  assert stacked['params']['blocks']['attn']['qkv']['kernel'].shape == (3, 32, 96)
  back = dinov2.weights_layout(stacked, ml_collections.ConfigDict({'scan_blocks': False}))
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, unrolled))
  assert jax.tree.structure(jax.eval_shape(dinov2.DinoV2(**vit, scan=True).init, jax.random.key(0), images)
                            ) == jax.tree.structure(stacked)

  def features_and_grads(model, params):
    loss = lambda p: sum(jnp.mean(jnp.sin(y)) for y in model.apply({'params': p}, images, method='features'))
    jaxpr = str(jax.make_jaxpr(loss)(params))
    return model.apply({'params': params}, images, method='features'), jax.grad(loss)(params), jaxpr

  plain, plain_grads, _ = features_and_grads(dinov2.DinoV2(**vit), unrolled['params'])
  for remat in (False, True):
    out, grads, jaxpr = features_and_grads(dinov2.DinoV2(**vit, scan=True, remat=remat), stacked['params'])
    assert jaxpr.count(' scan[') == 1  # the three blocks are one scanned block
    assert bool(re.search(r'= (?:remat2|checkpoint)\[', jaxpr)) == remat
    for a, b in zip(plain, out):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    grads = dinov2.weights_layout({'params': grads}, ml_collections.ConfigDict())['params']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), plain_grads, grads)


@pytest.fixture(scope='module')
def smoke(tiny_data_dir):
  from configs import kbcnet_dinov2_spair  # pylint: disable=g-import-not-at-top
  config = kbcnet_dinov2_spair.get_config('smoke')
  config.dataset.data_dir = tiny_data_dir
  return config


def test_a_frozen_dinov2_gets_no_gradient_and_a_fine_tuned_one_does(smoke):
  from misc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from misc_jax import optim  # pylint: disable=g-import-not-at-top
  from misc_jax import train  # pylint: disable=g-import-not-at-top
  batch = jax.tree.map(lambda x: x[:2], next(input_pipeline.train_iterator(smoke)))
  for frozen in (True, False):
    config = smoke.copy_and_resolve_references()
    config.model.freeze_backbone = frozen
    model_module, model = state_lib.create_model(config)
    state = state_lib.initial_state(config, model)
    loss = lambda p: model_module.train_loss(
        lambda s, t: state.apply_fn({'params': p, 'batch_stats': state.batch_stats}, s, t), batch, config)[0]
    grads = jax.jit(jax.grad(loss))(state.params)
    backbone = [np.abs(g).max() for g in jax.tree.leaves(grads['backbone'])]
    assert (max(backbone) == 0) == frozen
    labels = set(jax.tree.leaves(optim.param_labels(state.params, config.model)['backbone']))
    assert labels == ({'frozen'} if frozen else {'backbone'})
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads['csfa']))


def test_kbcnet_on_dinov2_trains_and_resumes(smoke, tmp_path):
  """Random ViT-S/14 weights, 56 px: two steps, then a restart that resumes at step 2 and trains a third
  (exact resume itself is tested on the ResNet model, tests/test_train.py; the mechanism is the same)."""
  from misc_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import configure  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  for total in (2, 3):
    config = configure(smoke.copy_and_resolve_references(), total_steps=total, eval_every_steps=3)
    metrics = train.train_and_evaluate(config, str(workdir))
  assert 0 <= metrics['pck@0.1'] <= 1
  with train.rundir.manager(workdir / 'checkpoints') as mgr:
    assert mgr.all_steps() == [1, 2, 3]
    before, after = mgr.restore(2)['params'], mgr.restore(3)['params']
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before, after))
  assert max(moved) > 0  # the third step trained from the second's parameters
  np.testing.assert_array_equal(before['backbone']['pos_embed'], after['backbone']['pos_embed'])  # frozen


def test_a_converted_backbone_loads_into_scanned_blocks(smoke, tmp_path):
  """Converted weights are written per block; a scan_blocks model receives them stacked."""
  import flax  # pylint: disable=g-import-not-at-top
  config = smoke.copy_and_resolve_references()
  _, model = state_lib.create_model(config)
  fresh = state_lib.initial_state(config, model)
  backbone = jax.tree.map(lambda x: np.asarray(x) + 1, fresh.params['backbone'])  # not the fresh values
  path = tmp_path / 'vits14.msgpack'
  path.write_bytes(flax.serialization.msgpack_serialize({'params': backbone}))
  config.model.scan_blocks, config.model.backbone_init = True, str(path)
  _, model = state_lib.create_model(config)
  loaded = state_lib.initial_state(config, model).params['backbone']
  np.testing.assert_array_equal(loaded['blocks']['mlp']['fc1']['kernel'][7],
                                backbone['blocks_7']['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(loaded['pos_embed'], backbone['pos_embed'])
