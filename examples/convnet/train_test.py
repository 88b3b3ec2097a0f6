"""Runs the ConvNet example on a tiny config, in seconds."""

import dataclasses
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from convnet import input_pipeline  # noqa: E402
from convnet import train  # noqa: E402


def _tiny():
  return dataclasses.replace(
    train.tiny_config(), widths=(4, 8), epochs=1.0, train_size=256
  )


@pytest.mark.parametrize('optimizer', ['muon', 'adamw', 'sgd', 'optax_muon'])
def test_train_and_evaluate(optimizer, tmp_path):
  dataset = input_pipeline.digits()
  result = train.train_and_evaluate(
    _tiny(),
    dataset,
    optimizer=optimizer,
    learning_rate=0.01,
    workdir=tmp_path,
  )
  assert (tmp_path / 'result.json').exists()
  assert result['total_steps'] == 4
  assert [h['step'] for h in result['history']] == [2, 4]
  assert math.isfinite(result['history'][-1]['train_loss'])
  assert 0.0 <= result['final']['test_accuracy'] <= 1.0


def test_holdout_test_split_is_disjoint_from_validation():
  n = 100
  ids = np.arange(n, dtype=np.int32)
  images = np.broadcast_to(ids[:, None, None, None] % 256, (n, 2, 2, 3))
  dataset = input_pipeline.Dataset(
    input_pipeline.Split(np.asarray(images, np.uint8), ids), None, ('a',), 's'
  )
  carved = input_pipeline.holdout_test(dataset, 20)
  train, val = input_pipeline.split_validation(carved.train, 10)
  parts = [set(carved.test.labels), set(val.labels), set(train.labels)]
  assert [len(p) for p in parts] == [20, 10, 70]
  assert set.union(*parts) == set(ids)
  for split in (carved.test, val, train):  # images stay with their labels
    np.testing.assert_array_equal(split.images[:, 0, 0, 0], split.labels)
  again = input_pipeline.holdout_test(dataset, 20)  # a fixed split
  np.testing.assert_array_equal(again.test.labels, carved.test.labels)
  with pytest.raises(ValueError, match='already has a test split'):
    input_pipeline.holdout_test(carved, 5)
  with pytest.raises(ValueError, match='test_size'):
    input_pipeline.holdout_test(dataset, 100)


def test_load_data_carves_a_test_split_when_absent(tmp_path):
  _write_jpegs(tmp_path / 'data')
  config = dataclasses.replace(_tiny(), test_size=2)
  dataset = train.load_data(str(tmp_path / 'data'), config, tmp_path / 'c')
  assert len(dataset.test.labels) == 2 and len(dataset.train.labels) == 4
  assert train.final_metric(dataset) == 'test_accuracy'
  default = dataclasses.replace(_tiny(), test_size=None)  # a fifth: 1 of 6
  dataset = train.load_data(str(tmp_path / 'data'), default, tmp_path / 'c')
  assert len(dataset.test.labels) == 1


def test_digits_shape():
  ds = input_pipeline.digits()
  assert ds.train.images.shape[1:] == (32, 32, 3)
  assert ds.train.images.dtype == np.uint8
  assert len(ds.classes) == 10


def _write_jpegs(root, n_per_class=3):
  from PIL import Image

  rng = np.random.default_rng(0)
  for c in ('cat', 'dog'):
    (root / 'train' / c).mkdir(parents=True)
    for i in range(n_per_class):
      x = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
      Image.fromarray(x).save(root / 'train' / c / f'{i:04d}.jpg')


def test_folder_and_cache(tmp_path):
  data = tmp_path / 'data'
  _write_jpegs(data)
  cache = tmp_path / 'cache'
  first = input_pipeline.load(data, cache)
  again = input_pipeline.load(data, cache)  # from the .npy cache
  assert first.classes == again.classes == ('cat', 'dog')
  assert first.train.images.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(first.train.images, again.train.images)
  np.testing.assert_array_equal(first.train.labels, [0, 0, 0, 1, 1, 1])
  assert first.test is None


def test_tar_archive(tmp_path):
  import tarfile

  src = tmp_path / 'src'
  _write_jpegs(src)
  data = tmp_path / 'data'
  data.mkdir()
  with tarfile.open(data / 'train.tar.gz', 'w:gz') as tar:
    tar.add(src / 'train', arcname='train')
  ds = input_pipeline.load(data, tmp_path / 'cache')
  assert ds.train.images.shape == (6, 32, 32, 3)


def test_missing_data_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    input_pipeline.load(tmp_path / 'absent')


CIFAR = pathlib.Path(__file__).resolve().parents[3] / 'shared/data/cifar10'


@pytest.mark.skipif(
  not (CIFAR / 'train.tar.gz').exists(),
  reason=f'CIFAR-10 archive not found at {CIFAR}',
)
def test_cifar_archive_loads(tmp_path):
  ds = input_pipeline.load(CIFAR)
  assert ds.train.images.shape == (50000, 32, 32, 3)
  assert len(ds.classes) == 10
