"""CWM sequence layout: patches <-> pointer/content tokens, orders, positions, loss weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainscale.cwm import sequence
from brainscale.cwm.sequence import Layout

LAYOUT = Layout(height=32, width=48, codebook=1024)   # 4 x 6 patches, 8 x 12 codes per frame


def _codes(rng, b, layout=LAYOUT):
  h, w = layout.height // layout.code_px, layout.width // layout.code_px
  return rng.integers(0, layout.codebook, (b, layout.frames, h, w)).astype(np.int32)


def test_layout_sizes():
  assert LAYOUT.grid == (4, 6) and LAYOUT.patches == 24
  assert LAYOUT.length == 2 * 24 * 5
  assert LAYOUT.vocab == 1024 + 48
  big = Layout(height=256, width=256, codebook=2 ** 16)
  assert big.length == 10_240 and big.vocab == 65_536 + 2048


@pytest.mark.parametrize('h,w,patch,code,match', [
    (30, 32, 8, 4, '30x32'), (32, 32, 8, 3, 'multiple'), (32, 32, 16, 4, '2x2')])
def test_layout_rejects_bad_geometry(h, w, patch, code, match):
  with pytest.raises(ValueError, match=match):
    Layout(height=h, width=w, codebook=16, patch=patch, code_px=code)


def test_patchify_takes_each_patch_2x2_codes_row_major():
  codes = _codes(np.random.default_rng(0), 2)
  content = np.asarray(sequence.patchify(jnp.asarray(codes), LAYOUT))
  assert content.shape == (2, 48, 4)
  for f in range(2):
    for i in range(4):
      for j in range(6):
        g = f * 24 + i * 6 + j
        np.testing.assert_array_equal(content[:, g], codes[:, f, 2 * i:2 * i + 2,
                                                            2 * j:2 * j + 2].reshape(2, 4))
  np.testing.assert_array_equal(sequence.unpatchify(content, LAYOUT), codes)


def test_round_trip_tokens_frames_tokens():
  """codes -> sequence (random order) -> parse -> same codes; sequence again -> same tokens."""
  rng = np.random.default_rng(1)
  codes = _codes(rng, 3)
  order = sequence.random_order(jax.random.key(0), 3, LAYOUT)
  seq = sequence.build(jnp.asarray(codes), order, LAYOUT)
  back, present = sequence.parse(np.asarray(seq.tokens_BxL), LAYOUT)
  np.testing.assert_array_equal(back, codes)
  assert present.all()
  again = sequence.build(jnp.asarray(back), order, LAYOUT)
  np.testing.assert_array_equal(again.tokens_BxL, seq.tokens_BxL)


def test_prefix_parses_to_the_patches_it_holds():
  codes = _codes(np.random.default_rng(2), 2)
  order = sequence.random_order(jax.random.key(1), 2, LAYOUT)
  seq = sequence.build(jnp.asarray(codes), order, LAYOUT)
  k = 30
  back, present = sequence.parse(np.asarray(seq.tokens_BxL[:, :5 * k]), LAYOUT)
  flat_present = present.reshape(2, -1)
  for b in range(2):
    assert set(np.flatnonzero(flat_present[b])) == set(np.asarray(order[b, :k]).tolist())
  content = np.asarray(sequence.patchify(jnp.asarray(back), LAYOUT))
  truth = np.asarray(sequence.patchify(jnp.asarray(codes), LAYOUT))
  np.testing.assert_array_equal(content[flat_present], truth[flat_present])
  with pytest.raises(ValueError, match='5 tokens per patch'):
    sequence.parse(np.asarray(seq.tokens_BxL[:, :7]), LAYOUT)
  with pytest.raises(ValueError, match='not a pointer'):
    sequence.parse(np.asarray(seq.tokens_BxL[:, 1:6]), LAYOUT)


def test_token_structure_pointer_then_four_codes():
  codes = _codes(np.random.default_rng(3), 1)
  order = sequence.random_order(jax.random.key(2), 1, LAYOUT)
  seq = sequence.build(jnp.asarray(codes), order, LAYOUT)
  tok = np.asarray(seq.tokens_BxL).reshape(1, -1, 5)
  np.testing.assert_array_equal(tok[..., 0], LAYOUT.codebook + np.asarray(order))
  assert (tok[..., 1:] < LAYOUT.codebook).all()
  np.testing.assert_array_equal(np.asarray(seq.content_BxL).reshape(1, -1, 5),
                                np.broadcast_to([False, True, True, True, True], tok.shape))
  np.testing.assert_array_equal(np.asarray(seq.frame_BxL).reshape(1, -1, 5)[..., 0],
                                np.asarray(order) // LAYOUT.patches)


def test_random_order_is_frame0_then_frame1_and_fresh_per_example():
  order = np.asarray(sequence.random_order(jax.random.key(3), 8, LAYOUT))
  p = LAYOUT.patches
  for row in order:
    assert sorted(row[:p]) == list(range(p))           # frame 0 first: a permutation
    assert sorted(row[p:]) == list(range(p, 2 * p))    # then frame 1
  assert len({tuple(r) for r in order}) == 8           # a fresh order per example
  again = np.asarray(sequence.random_order(jax.random.key(3), 8, LAYOUT))
  np.testing.assert_array_equal(order, again)


def test_positions_are_code_coordinates_and_frame():
  pos = sequence.patch_positions(LAYOUT)
  assert pos.shape == (48, 5, 3)
  g = 24 + 2 * 6 + 5                      # frame 1, patch row 2, column 5
  np.testing.assert_array_equal(pos[g, 0], [10.5, 4.5, 1])            # pointer: patch centre
  np.testing.assert_array_equal(pos[g, 1:], [[10, 4, 1], [11, 4, 1], [10, 5, 1], [11, 5, 1]])
  codes = _codes(np.random.default_rng(4), 1)
  order = sequence.random_order(jax.random.key(4), 1, LAYOUT)
  seq = sequence.build(jnp.asarray(codes), order, LAYOUT)
  np.testing.assert_array_equal(np.asarray(seq.pos_BxLx3).reshape(1, -1, 5, 3),
                                pos[np.asarray(order)])


def test_loss_weights_content_only_frame0_scaled_revealed_hidden():
  codes = _codes(np.random.default_rng(5), 2)
  order = sequence.random_order(jax.random.key(5), 2, LAYOUT)
  seq = sequence.build(jnp.asarray(codes), order, LAYOUT)
  w = np.asarray(sequence.loss_weights(seq, LAYOUT, frame0_weight=0.25))
  content, frame = np.asarray(seq.content_BxL), np.asarray(seq.frame_BxL)
  np.testing.assert_array_equal(w[~content], 0.0)
  np.testing.assert_array_equal(w[content & (frame == 0)], 0.25)
  np.testing.assert_array_equal(w[content & (frame == 1)], 1.0)
  w = np.asarray(sequence.loss_weights(seq, LAYOUT, frame0_weight=1.0,
                                       revealed_B=jnp.array([0, 3])))
  first = 5 * LAYOUT.patches
  assert w[0, first + 1] == 1.0
  np.testing.assert_array_equal(w[1, first:first + 15], 0.0)
  assert w[1, first + 16] == 1.0
