"""Fixtures shared by the data tests."""

import PIL.Image
import pytest


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A tiny TFDS dataset in array_record files, built without TensorFlow: image features are
  handed over as PIL images, which TFDS encodes with PIL (numpy arrays would need TensorFlow)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")

  class LvmSourcesTiny(tfds.core.GeneratorBasedBuilder):
    # A one-part module name: for builders in a package, TFDS 4.9 on Python >= 3.11 looks up the
    # `importlib_resources` backport, which none of its requirements install there.
    __module__ = "lvm_sources_tiny"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "grey": tfds.features.Image(shape=(None, None, 1)),
          "clip": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
          "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        grey = lambda v: PIL.Image.new("RGB", (24, 16), (v, v, v))
        yield i, {"image": grey(i * 50), "grey": PIL.Image.new("L", (9, 9), i),
                  "clip": [grey(i * 50 + t) for t in range(3)], "label": i}

  LvmSourcesTiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)
