"""Choosing tokens from logits: greedy, or sampled with temperature, top-k and top-p."""

import jax
import jax.numpy as jnp


def choose(logits_BxQxV: jax.Array, key: jax.Array | None = None, *, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Token ids [B, Q]: the argmax at temperature 0, else a sample of softmax(logits / T)
  restricted to the `top_k` most likely tokens (0: all) and to the smallest set whose
  probability reaches `top_p` (nucleus; 1: all)."""
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f'temperature={temperature}, top_k={top_k}, top_p={top_p}; expected '
                     'temperature >= 0, top_k >= 0 and 0 < top_p <= 1')
  if temperature == 0:
    return jnp.argmax(logits_BxQxV, -1).astype(jnp.int32)
  if key is None:
    raise ValueError('sampling at temperature > 0 needs a key')
  logits = logits_BxQxV.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth_BxQx1 = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_BxQx1, -jnp.inf, logits)
  if top_p < 1:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the tokens ranked above
    kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
    floor_BxQx1 = jnp.min(kept, axis=-1, keepdims=True)  # the least likely token kept
    logits = jnp.where(logits < floor_BxQx1, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)
