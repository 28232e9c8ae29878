"""synthetic_misc: procedurally generated multi-instance semantic correspondence pairs (no download).

The embedded default dataset of misc_jax. Each pair shows two images of one category (see shapes.py); each
image holds 1 to `max_instances` annotated instances of it, distractors of other categories, and a
cluttered background. Instances differ in shape parameters, pose, scale and texture; the two images of a
pair differ in instance count, layout and photometry. Besides the keypoints, every instance carries up to
49 dense training points, fixed affine combinations of its keypoints (shapes.py), so that training can
supervise far more than a few dozen points per pair. Every example is a pure function of (config seed,
split, index), so generation is deterministic and no image is shared across splits.
"""

import dataclasses
import multiprocessing

import numpy as np
import tensorflow_datasets as tfds

from misc_jax import features
from tfds_builders.synthetic_misc import shapes

_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  image_size: int = 256
  num_pairs: dict[str, int] = dataclasses.field(default_factory=dict)
  max_instances: int = 4
  max_distractors: int = 2
  extent_range: tuple[float, float] = (0.12, 0.6)  # object extent, as a fraction of the image side
  clutter: int = 24  # background shapes per image
  seed: int = 0


class Builder(tfds.core.GeneratorBasedBuilder):
  """Synthetic multi-instance correspondence pairs with masks, bboxes and keypoints."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: five shape categories, up to 12 keypoints.',
                   '1.1.0': 'Dense training points (up to 49 per instance, shapes.OUTLINES); the images, '
                            'keypoints and masks are those of 1.0.0.'}
  BUILDER_CONFIGS = [
      SyntheticConfig(
          name='default', description='256 px pairs, objects from 12% to 60% of the image side.',
          num_pairs={'train': 2000, 'validation': 200, 'test': 200}),
      SyntheticConfig(
          name='large',
          description="default's generator and seed with 20,000 training pairs: its first 2,000 training "
                      "pairs and its validation and test splits are default's, pair for pair.",
          num_pairs={'train': 20000, 'validation': 200, 'test': 200}),
      SyntheticConfig(
          name='small_objects',
          description='Objects from 6% to 20% of the image side (each under ~4% of the image area).',
          num_pairs={'train': 1000, 'validation': 200, 'test': 400}, extent_range=(0.06, 0.2),
          max_distractors=3, seed=1),
      SyntheticConfig(
          name='tiny', description='A handful of 64 px pairs, for tests.', image_size=64,
          num_pairs={'train': 6, 'validation': 3, 'test': 3}, max_instances=3, clutter=6, seed=2,
          extent_range=(0.3, 0.7)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features.pair_features(list(shapes.CATEGORIES), dense_points=True),
        supervised_keys=None,
        homepage='https://github.com/misc-jax/misc_jax',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self.builder_config.num_pairs}

  def _generate_examples(self, split):
    indices = range(self.builder_config.num_pairs[split])
    jobs = [(self.builder_config, split, i) for i in indices]
    workers = multiprocessing.cpu_count()
    if workers <= 1 or len(jobs) < 16:
      yield from map(_make_example, jobs)
      return
    # Rendering is pure numpy; the pool keeps every core busy while TFDS encodes and writes here.
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      yield from pool.imap(_make_example, jobs, chunksize=8)


def make_pair(config: SyntheticConfig, split: str, index: int) -> dict:
  """Renders pair `index` of `split`: the example dict with masks as [I, H, W] bool arrays."""
  rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
  category = str(rng.choice(list(shapes.CATEGORIES)))
  example = {'pair_id': f'{split}_{index:06d}', 'category': category}
  for side in features.SIDES:
    image, annotations = shapes.render_image(
        rng, category, int(rng.integers(1, config.max_instances + 1)), size=config.image_size,
        extent_range=config.extent_range, max_distractors=config.max_distractors,
        clutter=config.clutter)
    example[side] = dict(image=image, **annotations)
  return example


def _make_example(job):
  config, split, index = job
  example = make_pair(config, split, index)
  features.validate_pair(example, dataset='synthetic_misc', split=split, key=example['pair_id'])
  for side in features.SIDES:  # Masks are stored as 0/255 PNGs.
    example[side]['masks'] = [m[..., None].astype(np.uint8) * 255 for m in example[side]['masks']]
  return example['pair_id'], example
