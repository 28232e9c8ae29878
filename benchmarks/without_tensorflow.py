"""Runs a benchmark where TensorFlow is not installed, e.g. on an accelerator image:

  python benchmarks/without_tensorflow.py benchmarks/train_step.py --variants kbcnet_r101 ...

misc_jax.train imports the tf.data input pipeline (and clu its TensorBoard writer), which the train-step
benchmarks never call: they use random inputs. This replaces tensorflow, tensorflow_datasets and
TensorBoard's hparams plugin by stubs, then runs the script. The H100 numbers in docs/performance.md were
measured this way; anything that does call TensorFlow gets the stub back, not data.
"""

import runpy
import sys

STUBBED = ('tensorflow', 'tensorflow.compat', 'tensorflow.compat.v2', 'tensorflow_datasets',
           'tensorflow_datasets.core', 'tensorflow_datasets.core.utils', 'tensorboard.plugins.hparams',
           'tensorboard.plugins.hparams.api')


class _Anything(type):
  """Any attribute is the stub again (so module-level subclassing works), and so is a call."""

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return cls

  def __call__(cls, *args, **kwargs):
    return cls


class _Stub(metaclass=_Anything):
  pass


def main():
  for name in STUBBED:
    sys.modules[name] = _Stub
  sys.argv = sys.argv[1:]
  sys.path.insert(0, '.')  # the repository root, where misc_jax is not installed
  runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
  main()
