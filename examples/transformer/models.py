"""A small decoder-only byte-level Transformer, in Flax NNX."""

from flax import nnx
import jax
import jax.numpy as jnp

import muon_optax


class Block(nnx.Module):
  """Pre-norm causal self-attention and a GELU MLP, each residual."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    record_max_logits: bool = False,
    rngs: nnx.Rngs,
  ):
    self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
    # With `record_max_logits`, the attention also records each head's
    # largest logit of the step (for `muon_optax.qk_clip`).
    extra = {'attention_fn': muon_optax.max_logit_attention}
    self.attn = nnx.MultiHeadAttention(
      num_heads=num_heads,
      in_features=d_model,
      use_bias=False,
      decode=False,
      rngs=rngs,
      **(extra if record_max_logits else {}),
    )
    self.record_max_logits = record_max_logits
    self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(
      self.attn_norm(x), mask=mask, sow_weights=self.record_max_logits
    )
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
  """Token and position embeddings, `Block`s, a final norm and `lm_head`.

  `token_embed`, `pos_embed` and `lm_head` go to Adam under
  `muon_optax.route`; the attention and MLP kernels go to Muon.

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> model = Transformer(256, 16, d_model=32, num_layers=1, num_heads=2,
  ...                     rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 256)
  """

  def __init__(
    self,
    vocab_size: int,
    context: int,
    *,
    d_model: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    record_max_logits: bool = False,
    rngs: nnx.Rngs,
  ):
    self.token_embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos_embed = nnx.Embed(context, d_model, rngs=rngs)
    self.blocks = nnx.List(
      [
        Block(
          d_model, num_heads, record_max_logits=record_max_logits, rngs=rngs
        )
        for _ in range(num_layers)
      ]
    )
    self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.lm_head = nnx.Linear(d_model, vocab_size, use_bias=False, rngs=rngs)
    self.record_max_logits = record_max_logits

  def __call__(self, tokens: jax.Array) -> jax.Array:
    positions = jnp.arange(tokens.shape[-1])
    x = self.token_embed(tokens) + self.pos_embed(positions)
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.lm_head(self.final_norm(x))
