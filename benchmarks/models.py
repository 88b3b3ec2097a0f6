"""Small NNX models for the train-step benchmark, used when the examples'
models are not importable (same routing conventions: `embed` and `head` go
to Adam by name, every other matrix and conv kernel to Muon)."""

from flax import nnx
import jax
import jax.numpy as jnp


class Block(nnx.Module):
  """Pre-LN causal self-attention (2-D q/k/v/o) and a 4d GELU MLP."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.query = nnx.Linear(d, d, rngs=rngs)
    self.key = nnx.Linear(d, d, rngs=rngs)
    self.value = nnx.Linear(d, d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
    self.proj = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.ln1(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    att = jnp.einsum('bqhc,bkhc->bhqk', q, k) / jnp.sqrt(d // self.heads)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    y = jnp.einsum('bhqk,bkhc->bqhc', att, v).reshape(b, t, d)
    x = x + self.out(y)
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class Transformer(nnx.Module):
  """A char-level decoder: token and position embeddings, blocks, head."""

  def __init__(
    self,
    vocab_size: int = 65,
    d: int = 128,
    num_layers: int = 2,
    heads: int = 4,
    seq_len: int = 64,
    *,
    rngs: nnx.Rngs,
  ):
    self.embed = nnx.Embed(vocab_size, d, rngs=rngs)
    self.pos_embed = nnx.Embed(seq_len, d, rngs=rngs)
    self.blocks = nnx.List(
      [Block(d, heads, rngs=rngs) for _ in range(num_layers)]
    )
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))
