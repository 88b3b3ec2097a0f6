"""Runs the diffusion example on a tiny config, in seconds, and checks its
pieces against independent computations."""

import json
import math
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import muon_optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffusion import ddpm  # noqa: E402
from diffusion import models  # noqa: E402
from diffusion import train  # noqa: E402
from diffusion.configs import tiny  # noqa: E402


def _with(config, **changes):
  """A copy of `config` with these (existing) fields set."""
  config = config.copy_and_resolve_references()
  for name, value in changes.items():
    assert name in config, name
    setattr(config, name, value)
  return config


def _tiny(**changes):
  return _with(
    tiny.get_config(),
    widths=(4, 8), groups=2, steps=4, eval_every=2, eval_size=20,
    eval_levels=4, eval_batch_size=8, samples=4, sample_steps=3, train_size=64,
    batch_size=16, **changes,
  )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['muon', 'adamw'])
def test_train_and_evaluate(optimizer, tmp_path):
  result = train.train_and_evaluate(
    _tiny(optimizer=optimizer, learning_rate=0.01), tmp_path
  )
  assert json.loads((tmp_path / 'result.json').read_text()) == result
  assert [h['step'] for h in result['history']] == [2, 4]
  assert all(math.isfinite(h['val_loss']) for h in result['history'])
  final = result['final']
  assert set(final['test_loss_by_t']) == {'125', '375', '625', '875'}
  np.testing.assert_allclose(
    final['test_loss'], np.mean(list(final['test_loss_by_t'].values()))
  )
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(tmp_path / 'samples.png') as im:
    assert im.size == (4 * 34, 34)  # 4 samples of 32 pixels, 2-pixel gaps
  assert (result['routing'] is not None) == (optimizer == 'muon')


@pytest.mark.slow
def test_main_without_flags_trains_the_tiny_config(tmp_path):
  """Without --config: the tiny config on the bundled digits (made smaller
  still here), the flags as a user types them."""
  cmd = [
    sys.executable,
    str(pathlib.Path(__file__).with_name('main.py')),
    f'--workdir={tmp_path}',
    '--config.widths=(4, 8)',
    '--config.groups=2',
    '--config.steps=2',
    '--config.eval_every=2',
    '--config.eval_size=20',
    '--config.eval_levels=4',
    '--config.eval_batch_size=8',
    '--config.samples=4',
    '--config.sample_steps=3',
    '--config.train_size=64',
    '--config.batch_size=16',
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['total_steps'] == 2 and result['optimizer'] == 'muon'
  assert 'CIFAR' not in result['data'] and 'digits' in result['data']
  assert (tmp_path / 'samples.png').is_file()
  bad = subprocess.run(
    [*cmd[:3], '--epochs=1'], capture_output=True, text=True, check=False
  )
  assert bad.returncode != 0 and 'epochs' in bad.stderr


def test_cosine_schedule_matches_its_closed_form():
  """ᾱ_t = f(t+1)/f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2), wherever
  no β hit its 0.999 cap."""
  T, s = 1000, 0.008
  f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
  expected = f(np.arange(1, T + 1)) / f(0)
  got = ddpm.cosine_alpha_bars(T)
  np.testing.assert_allclose(got[:990], expected[:990], rtol=1e-5)
  betas = 1 - got[1:] / got[:-1]
  assert betas.max() <= 0.999 + 1e-6


def test_noising_keeps_unit_variance():
  key = jax.random.key(0)
  x0 = jax.random.normal(key, (4096, 2, 2, 1))
  noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  alpha_bars = jnp.asarray(ddpm.cosine_alpha_bars(100))
  for t in (0, 50, 99):
    x = ddpm.add_noise(x0, jnp.full(4096, t), noise, alpha_bars)
    np.testing.assert_allclose(float(jnp.var(x)), 1.0, atol=0.05)


def _oracle(x0, alpha_bars):
  """The exact noise predictor for a known clean image x0."""

  def predict(x, t):
    a = alpha_bars[t][:, None, None, None]
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  return predict


def test_the_exact_noise_has_zero_loss_and_ddim_recovers_the_image():
  alpha_bars = jnp.asarray(ddpm.cosine_alpha_bars(1000))
  key = jax.random.key(0)
  x0 = jax.random.uniform(key, (3, 8, 8, 3), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  t = jnp.array([0, 500, 999])
  loss = ddpm.denoising_loss(_oracle(x0, alpha_bars), x0, t, noise, alpha_bars)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  start = jax.random.normal(jax.random.fold_in(key, 2), x0.shape)
  out = ddpm.ddim_sample(_oracle(x0, alpha_bars), start, alpha_bars, 5)
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_eval_noise_depends_on_the_image_index_alone():
  key = jax.random.key(3, impl='threefry2x32')
  whole = ddpm.eval_noise(key, 0, 10, (2, 2, 3))
  parts = [ddpm.eval_noise(key, i, 5, (2, 2, 3)) for i in (0, 5)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))
  assert not np.allclose(whole[0], whole[1])


@pytest.mark.slow
def test_evaluate_is_the_same_for_every_batch_size():
  config = _tiny()
  model = train.create_model(config)
  alpha_bars = jnp.asarray(ddpm.cosine_alpha_bars(config.timesteps))
  images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), np.uint8)
  a = train.evaluate(model, images, 4, 12, alpha_bars)
  b = train.evaluate(model, images, 4, 5, alpha_bars)  # a padded last batch
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  assert a[1].keys() == b[1].keys() == {125, 375, 625, 875}


def test_unet_shapes_and_parameters():
  model = models.UNet((8, 16), blocks=1, heads=2, groups=4, rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 32, 32, 3))
  assert model(x, jnp.array([0, 999])).shape == (2, 32, 32, 3)
  assert model.conv_in.kernel.shape == (2, 2, 3, 8)  # the 2x2 patch stem
  assert isinstance(model.upsample[0], nnx.ConvTranspose)
  assert model.up[0][0].conv1.kernel.shape == (3, 3, 32, 16)  # skip concat
  assert model.head.kernel.shape == (2, 2, 8, 3)


def _labels_by_path(model):
  leaves = jax.tree_util.tree_leaves_with_path(muon_optax.route(model).labels)
  return {
    '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): v
    for path, v in leaves
  }


def test_routing_convs_time_mlp_and_attention_on_muon_the_rest_on_adam():
  """The issue's routing, leaf by leaf, from the library's defaults."""
  model = train.create_model(tiny.get_config())
  labels = _labels_by_path(model)
  print(muon_optax.describe(model))
  muon = {p for p, v in labels.items() if v == 'muon'}
  for path, label in labels.items():
    last = path.rsplit('/', 1)[-1]
    if path.startswith('head/'):  # the output conv
      assert label == 'adam', path
    elif last in ('bias', 'scale'):  # biases, GroupNorm
      assert label == 'adam', path
    else:
      assert last == 'kernel', path
      assert label == 'muon', path
  expected = {
    'conv_in/kernel',
    'time_mlp1/kernel',
    'time_mlp2/kernel',
    'upsample/0/kernel',  # the transposed conv
    'mid_attention/attention/query/kernel',
    'mid_attention/attention/key/kernel',
    'mid_attention/attention/value/kernel',
    'mid_attention/attention/out/kernel',
    'down/0/0/conv1/kernel',
    'down/0/0/time/kernel',
    'up/0/0/shortcut/kernel',
  }
  assert expected <= muon


def test_input_pipeline_is_the_convnets():
  here = (HERE / 'input_pipeline.py').read_text()
  assert here == (HERE.parent / 'convnet/input_pipeline.py').read_text()
