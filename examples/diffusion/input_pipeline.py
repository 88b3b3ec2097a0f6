"""32x32 RGB image data: folders, tar.gz archives, CIFAR-10 batches, digits.

Images are decoded once and cached as uint8 `.npy` arrays (outside the repo,
in `~/.cache/muon_optax` unless told otherwise); later runs memory-map them.
`get_datasets(config)` returns the train, validation and test splits.

`convnet/`, `resnet/` and `diffusion/input_pipeline.py` are the same file
(a test keeps them so), so each example can be copied out on its own and
all see the same splits.
"""

from collections.abc import Iterator
import hashlib
import io
import os
import pathlib
import pickle
import tarfile
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SHAPE = (32, 32, 3)
DEFAULT_CACHE_DIR = pathlib.Path(
  os.environ.get('MUON_OPTAX_CACHE', '~/.cache/muon_optax')
).expanduser()


class Split(NamedTuple):
  images: np.ndarray  # (N, 32, 32, 3) uint8
  labels: np.ndarray  # (N,) int32


class Dataset(NamedTuple):
  train: Split
  test: Split | None
  classes: tuple[str, ...]
  source: str


class Splits(NamedTuple):
  """What a run trains, validates and tests on."""

  train: Split
  val: Split
  test: Split | None  # None only when `test_size=0` and the data has none
  classes: tuple[str, ...]
  source: str


def digits() -> Dataset:
  """scikit-learn's bundled 8x8 digits as 32x32x3 (no download).

  The last 20% of a fixed shuffle is the test split.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  d = datasets.load_digits()
  x = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8)
  x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
  x = np.repeat(x[..., None], 3, axis=-1)
  y = d.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  n_test = len(y) // 5
  return Dataset(
    train=Split(x[:-n_test], y[:-n_test]),
    test=Split(x[-n_test:], y[-n_test:]),
    classes=tuple(str(c) for c in d.target_names),
    source='sklearn digits (8x8 upsampled to 32x32x3)',
  )


def _decode(data: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(io.BytesIO(data)) as im:
    x = np.asarray(im.convert('RGB'), dtype=np.uint8)
  if x.shape != IMAGE_SHAPE:
    raise ValueError(f'Expected {IMAGE_SHAPE} images, got {x.shape}.')
  return x


def _pack(items: list[tuple[str, bytes]], classes: list[str]) -> Split:
  items = sorted(items)
  index = {c: i for i, c in enumerate(classes)}
  images = np.stack([_decode(b) for _, b in items])
  labels = np.array([index[k.split('/')[-2]] for k, _ in items], np.int32)
  return Split(images, labels)


def _read_folder(root: pathlib.Path) -> list[tuple[str, bytes]]:
  exts = ('.jpg', '.jpeg', '.png')
  files = [p for p in root.glob('*/*') if p.suffix.lower() in exts]
  return [(str(p.relative_to(root.parent)), p.read_bytes()) for p in files]


def _read_tar(path: pathlib.Path) -> list[tuple[str, bytes]]:
  exts = ('.jpg', '.jpeg', '.png')
  items = []
  with tarfile.open(path, 'r:gz') as tar:
    for member in tar:
      if member.isfile() and member.name.lower().endswith(exts):
        items.append((member.name, tar.extractfile(member).read()))
  return items


def _read_cifar_batches(root: pathlib.Path) -> Dataset:
  def load(name):
    with open(root / name, 'rb') as f:
      d = pickle.load(f, encoding='bytes')
    x = d[b'data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x.astype(np.uint8), np.asarray(d[b'labels'], np.int32)

  parts = [load(f'data_batch_{i}') for i in range(1, 6)]
  train = Split(
    np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  )
  test = Split(*load('test_batch')) if (root / 'test_batch').exists() else None
  with open(root / 'batches.meta', 'rb') as f:
    meta = pickle.load(f, encoding='bytes')
  classes = tuple(c.decode() for c in meta[b'label_names'])
  return Dataset(train, test, classes, str(root))


def _decode_source(root: pathlib.Path) -> Dataset:
  """Decodes whichever layout `root` holds."""
  for cand in (root, root / 'cifar-10-batches-py'):
    if (cand / 'data_batch_1').exists():
      return _read_cifar_batches(cand)
  splits = {}
  for split in ('train', 'test'):
    if (root / split).is_dir():
      splits[split] = _read_folder(root / split)
    elif (root / f'{split}.tar.gz').exists():
      splits[split] = _read_tar(root / f'{split}.tar.gz')
  if 'train' not in splits:
    raise FileNotFoundError(
      f'{root} holds none of: train/<class>/*.jpg, train.tar.gz, '
      'cifar-10-batches-py/.'
    )
  classes = sorted({k.split('/')[-2] for k, _ in splits['train']})
  train = _pack(splits['train'], classes)
  test = _pack(splits['test'], classes) if 'test' in splits else None
  return Dataset(train, test, tuple(classes), str(root))


def _cache_key(root: pathlib.Path) -> str:
  stats = []
  for p in sorted(root.iterdir()):
    st = p.stat()
    stats.append(f'{p.name}:{st.st_size}:{int(st.st_mtime)}')
  text = f'{root.resolve()}|{"|".join(stats)}'
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(
  data: str | os.PathLike | None = None,
  cache_dir: str | os.PathLike | None = None,
) -> Dataset:
  """The dataset at `data` (decoded once, then cached), or digits if None."""
  if data is None:
    return digits()
  root = pathlib.Path(data).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f'`--data` {str(root)!r} is not a directory.')
  cache = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR) / _cache_key(root)
  names = ('train_x', 'train_y', 'test_x', 'test_y')
  if (cache / 'classes.txt').exists():
    arrays = {}
    for n in names:
      f = cache / f'{n}.npy'
      arrays[n] = np.load(f, mmap_mode='r') if f.exists() else None
    test = None
    if arrays['test_x'] is not None:
      test = Split(arrays['test_x'], arrays['test_y'])
    classes = tuple((cache / 'classes.txt').read_text().split('\n'))
    return Dataset(
      Split(arrays['train_x'], arrays['train_y']), test, classes, str(root)
    )
  ds = _decode_source(root)
  cache.mkdir(parents=True, exist_ok=True)
  np.save(cache / 'train_x.npy', ds.train.images)
  np.save(cache / 'train_y.npy', ds.train.labels)
  if ds.test is not None:
    np.save(cache / 'test_x.npy', ds.test.images)
    np.save(cache / 'test_y.npy', ds.test.labels)
  (cache / 'classes.txt').write_text('\n'.join(ds.classes))
  return ds


def holdout_test(dataset: Dataset, test_size: int) -> Dataset:
  """Carves a test split from the training images of test-less data.

  The test images are the tail of a fixed shuffle (seed 1) of the training
  split; the validation split is then carved from what is left, so learning
  rates are chosen on images the reported test accuracy never sees.
  """
  if dataset.test is not None:
    raise ValueError('The dataset already has a test split.')
  n = len(dataset.train.labels)
  if not 0 < test_size < n:
    raise ValueError(
      f'`test_size` must be in (0, {n}) for these {n} training images, got '
      f'{test_size} (compare.py: --set test_size=N).'
    )
  order = np.random.default_rng(1).permutation(n)
  test_idx, train_idx = np.sort(order[-test_size:]), np.sort(order[:-test_size])
  train, images = dataset.train, np.asarray(dataset.train.images)
  return dataset._replace(
    train=Split(images[train_idx], train.labels[train_idx]),
    test=Split(images[test_idx], train.labels[test_idx]),
    source=f'{dataset.source}; test = {test_size} training images held out',
  )


def split_validation(
  train: Split, val_size: int, train_size: int | None = None
) -> tuple[Split, Split]:
  """(train, val): val is the tail of a fixed shuffle of the training split.

  `train_size` keeps a fixed subset (the head of the same shuffle) of what
  is left, so every optimizer and seed sees the same images.
  """
  n = len(train.labels)
  if not 0 < val_size < n:
    raise ValueError(f'`val_size` must be in (0, {n}), got {val_size}.')
  order = np.random.default_rng(0).permutation(n)
  val_idx, train_idx = np.sort(order[-val_size:]), order[:-val_size]
  if train_size is not None:
    if not 0 < train_size <= len(train_idx):
      raise ValueError(
        f'`train_size` must be in (0, {len(train_idx)}], got {train_size}.'
      )
    train_idx = train_idx[:train_size]
  train_idx = np.sort(train_idx)
  return (
    Split(np.asarray(train.images[train_idx]), train.labels[train_idx]),
    Split(np.asarray(train.images[val_idx]), train.labels[val_idx]),
  )


def batches(
  split: Split, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled full batches (the remainder is dropped)."""
  order = rng.permutation(len(split.labels))
  for i in range(len(order) // batch_size):
    idx = order[i * batch_size : (i + 1) * batch_size]
    yield split.images[idx], split.labels[idx]


def get_datasets(config: Any) -> Splits:
  """The splits `config` asks for (its `data`, `cache_dir`, `test_size`,
  `val_size` and `train_size`).

  Data without a test split gets one carved from its training images first
  (`test_size`; None: a fifth, at most 10,000); the validation split comes
  from what is left; `train_size` keeps a fixed subset of the rest. The same
  config gives the same splits for every optimizer and seed.
  """
  dataset = load(config.data, config.cache_dir)
  size = config.test_size
  if size is None:
    size = min(10_000, len(dataset.train.labels) // 5)
  if dataset.test is None and size:
    dataset = holdout_test(dataset, size)
  train, val = split_validation(
    dataset.train, config.val_size, config.train_size
  )
  return Splits(train, val, dataset.test, dataset.classes, dataset.source)


def augment(
  key: jax.Array, images: jax.Array, flip: bool, translate: int
) -> jax.Array:
  """Random flips and translations (reflect padding) of a uint8 NHWC batch."""
  n, h, w, c = images.shape
  key_flip, key_shift = jax.random.split(key)
  if flip:
    mirror = jax.random.bernoulli(key_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1], images)
  if translate:
    t = translate
    padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)), mode='reflect')
    offsets = jax.random.randint(key_shift, (n, 2), 0, 2 * t + 1)
    images = jax.vmap(
      lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    )(padded, offsets)
  return images


def channel_stats(split: Split) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of `split`'s pixels in [0, 1]."""
  pixels = np.asarray(split.images).reshape(-1, 3) / 255.0
  return pixels.mean(0).astype(np.float32), pixels.std(0).astype(np.float32)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  return (images.astype(jnp.float32) / 255.0 - mean) / std
