"""A seconds-long run on the embedded corpus (Python stdlib sources)."""

from transformer.configs import default


def get_config() -> default.Config:
  return default.get_config().replace(
    data=None,
    max_bytes=500_000,
    d_model=64,
    num_layers=1,
    num_heads=2,
    context=32,
    batch_size=16,
    steps=100,
    eval_every=20,
    eval_windows=128,
  )
