"""Rotary position embeddings (brainscale.nn.rope_1d / rope_nd / apply_rope) against
pair-by-pair rotations in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainscale import nn
from brainscale.nn import embeddings as embeddings_lib
from nn_helpers import BF16, FP32, FP32_DEEP, close, normal, rope_rotate_jnp


def rope_ref_np(x_BxTxNxH, angle_BxTxP):
  """Rotates pair (i, i + H/2) of every head by angle_BxTxP[b, t, i], one pair at a time."""
  x = np.asarray(x_BxTxNxH, np.float64)
  out = x.copy()
  b, t, n, h = x.shape
  for bi in range(b):
    for ti in range(t):
      for ni in range(n):
        for i in range(h // 2):
          a = angle_BxTxP[bi, ti, i]
          x1, x2 = x[bi, ti, ni, i], x[bi, ti, ni, i + h // 2]
          out[bi, ti, ni, i] = x1 * math.cos(a) - x2 * math.sin(a)
          out[bi, ti, ni, i + h // 2] = x2 * math.cos(a) + x1 * math.sin(a)
  return out


def angles_1d_np(t_BxT, head_dim, base):
  pairs = head_dim // 2
  t = np.asarray(t_BxT, np.float64)
  return np.stack([t * base ** (-i / pairs) for i in range(pairs)], axis=-1)


@pytest.mark.parametrize('base', [10_000.0, 100.0])
def test_rope_1d_matches_pairwise_rotation(rng, base):
  t_BxT = jnp.asarray(rng.uniform(0, 50, (2, 3)), jnp.float32)
  x_BxTxNxH = normal(rng, 2, 3, 2, 8)
  out = nn.apply_rope(x_BxTxNxH, nn.rope_1d(t_BxT, 8, base=base))
  close(out, rope_ref_np(x_BxTxNxH, angles_1d_np(t_BxT, 8, base)), FP32_DEEP)


def test_apply_rope_grad_and_dtype(rng):
  rot = nn.rope_1d(jnp.asarray(rng.uniform(0, 20, (2, 4)), jnp.float32), 8)
  x_BxTxNxH, ct_BxTxNxH = normal(rng, 2, 4, 3, 8), normal(rng, 2, 4, 3, 8)
  close(jax.grad(lambda x: jnp.sum(nn.apply_rope(x, rot) * ct_BxTxNxH))(x_BxTxNxH),
        jax.grad(lambda x: jnp.sum(rope_rotate_jnp(x, rot) * ct_BxTxNxH))(x_BxTxNxH), FP32)
  x_bf16 = x_BxTxNxH.astype(jnp.bfloat16)
  out_bf16 = nn.apply_rope(x_bf16, rot)
  assert out_bf16.dtype == jnp.bfloat16
  close(out_bf16, rope_rotate_jnp(x_bf16.astype(jnp.float32), rot), BF16)


@pytest.mark.parametrize('integer_times', [True, False])
def test_rope_relative_position_invariance(rng, integer_times):
  q_H, k_H = normal(rng, 16), normal(rng, 16)
  a, b = rng.uniform(0, 30, 2)
  shift = rng.uniform(-20, 20)
  if integer_times:
    a, b, shift = round(a), round(b), round(shift)

  def score(ta, tb):
    rot = nn.rope_1d(jnp.asarray([[ta, tb]], jnp.float32), 16)
    q = nn.apply_rope(jnp.broadcast_to(q_H, (1, 2, 1, 16)), rot)[0, 0, 0]
    k = nn.apply_rope(jnp.broadcast_to(k_H, (1, 2, 1, 16)), rot)[0, 1, 0]
    return float(q @ k)

  # Depends on position (else this could not fail), but only through a - b.
  assert abs(score(a, b) - score(a + 3.7, b)) > 1e-3
  assert score(a, b) == pytest.approx(score(a + shift, b + shift), rel=1e-4, abs=1e-4)


def test_split_pairs():
  assert embeddings_lib.split_pairs(32, (6, 6, 4)) == (6, 6, 4)
  assert embeddings_lib.split_pairs(64, (6, 6, 4)) == (12, 12, 8)
  assert embeddings_lib.split_pairs(20, (6, 6, 4)) == (3, 3, 4)  # remainder goes last
  with pytest.raises(ValueError):
    embeddings_lib.split_pairs(4, (6, 6, 4))
  with pytest.raises(ValueError):
    nn.rope_1d(jnp.zeros((1, 2)), 7)
  with pytest.raises(ValueError):
    nn.rope_nd(jnp.zeros((1, 2, 2)), 32)


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_rope_nd_single_axis_is_rope_1d_on_its_block(rng, axis):
  counts, offsets = (6, 6, 4), (0, 6, 12)
  pos_BxTxA = np.zeros((2, 5, 3), np.float32)
  pos_BxTxA[..., axis] = rng.uniform(-10, 10, (2, 5))
  rot = nn.rope_nd(jnp.asarray(pos_BxTxA), 32, split=(6, 6, 4))
  assert rot.cos_BxTxP.shape == (2, 5, 16)
  block = slice(offsets[axis], offsets[axis] + counts[axis])
  ref = nn.rope_1d(jnp.asarray(pos_BxTxA[..., axis]), 2 * counts[axis], base=100.0)
  close(rot.cos_BxTxP[..., block], ref.cos_BxTxP, FP32)
  close(rot.sin_BxTxP[..., block], ref.sin_BxTxP, FP32)
  others = np.ones(16, bool)
  others[block] = False
  np.testing.assert_array_equal(rot.cos_BxTxP[..., others], 1.0)
  np.testing.assert_array_equal(rot.sin_BxTxP[..., others], 0.0)


def test_rope_nd_apply_matches_pairwise_rotation(rng):
  pos_BxTxA = rng.uniform(0, 8, (2, 3, 3)).astype(np.float32)
  x_BxTxNxH = normal(rng, 2, 3, 2, 32)
  angle_BxTxP = np.concatenate([angles_1d_np(pos_BxTxA[..., a], 2 * c, 100.0)
                                for a, c in enumerate((6, 6, 4))], -1)
  out = nn.apply_rope(x_BxTxNxH, nn.rope_nd(jnp.asarray(pos_BxTxA), 32))
  close(out, rope_ref_np(x_BxTxNxH, angle_BxTxP), FP32_DEEP)
