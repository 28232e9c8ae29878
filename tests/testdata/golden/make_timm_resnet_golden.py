r"""Writes timm_resnet101_features.npz: timm's ResNet-101 on the formula weights of the torchvision golden.

  /tmp/goldens/bin/python tests/testdata/golden/make_timm_resnet_golden.py   # the venv of
                                                                             # make_dinov2_library_goldens.py

Never needed by CI or the tests. timm's `resnet101` (the architecture of `resnet101.a1_in1k` and the other
plain timm ResNet-101 weights) loads torchvision's state_dict names as they are; the weights are
torchvision_resnet101_state_dict_spec.json's formula (shared/golden), the input the torchvision golden's
(sin(0.05 * arange) over [1, 3, 96, 128]). Saved: layer2, layer3, layer4 (NCHW) and the logits.
"""

import os
import sys

import numpy as np
import timm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/: the formula weights the tests use too
import golden_weights  # pylint: disable=g-import-not-at-top,wrong-import-position


def torch_arrays(state):
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def main():
  model = timm.create_model('resnet101', pretrained=False).eval()
  model.load_state_dict(torch_arrays(golden_weights.resnet101()), strict=True)
  image = torch.tensor(np.sin(0.05 * np.arange(3 * 96 * 128)).reshape(1, 3, 96, 128), dtype=torch.float32)
  outputs = {}
  with torch.no_grad():
    x = model.maxpool(model.act1(model.bn1(model.conv1(image))))
    for name in ('layer1', 'layer2', 'layer3', 'layer4'):
      x = getattr(model, name)(x)
      outputs[name] = x.numpy()
    outputs['logits'] = model(image).numpy()
  del outputs['layer1']  # the largest map; layer2 already depends on it
  np.savez_compressed(os.path.join(HERE, 'timm_resnet101_features.npz'), version=timm.__version__, **outputs)
  print(timm.__version__, {k: v.shape for k, v in outputs.items()})


if __name__ == '__main__':
  main()
