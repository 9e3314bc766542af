"""The probes against a model that knows the motion (cwm/oracle.py): KL-tracing gives back
the exact flow of synthetic clips and calls occluded points occluded; broken probes and a
model that knows nothing fail the same check; predict_frame and move_patch give back a
known translation."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale.cwm import counterfactual, oracle, sequence, tracking
from brainscale.cwm import tokenizer as tokenizer_lib
from brainscale.data.synthetic import physics

SIZE, CODE = 48, 4
SPEC = physics.Spec(size=SIZE, frames=4, speed=(1.0, 4.0), flow_gap=3)
CLIPS = (2, 5, 7)            # seeds; each has cells that become hidden (checked below)
POINTS, HIDDEN = 10, 2       # per clip: traced cells that stay visible, and that become hidden
OCCLUSION_KL = 0.5


def _tokenizer():
  c = config_lib.resolve('cwm_tokenizer_tiny', [])
  return tokenizer_lib.Tokenizer(config_lib.typed(tokenizer_lib.Spec, c.model), rngs=nnx.Rngs(0))


def _layout(tok):
  return sequence.Layout(SIZE, SIZE, codebook=tok.vocab, code_px=CODE)


@nnx.jit
def _trace(model, frames, points):
  return counterfactual.kl_flow(model, frames, points, orders=1)


@pytest.fixture(scope='module')
def clips():
  """Frames 0 and gap of three clips, their exact flow, and points at code-cell centres:
  POINTS cells whose pixels all stay visible, then HIDDEN whose pixels all become hidden."""
  rng = np.random.default_rng(0)
  rendered = [physics.render(s, SPEC) for s in CLIPS]
  frames = np.stack([c.frames_TxHxWx3[[0, SPEC.flow_gap]] for c in rendered])
  flow = np.stack([c.flow_TxHxWx2[0] for c in rendered])
  visible = np.stack([c.visible_TxHxW[0] for c in rendered])
  g = SIZE // CODE
  cells = visible.reshape(len(CLIPS), g, CODE, g, CODE)
  points = []
  for seen, hidden in zip(cells.all((2, 4)), (~cells).all((2, 4))):
    assert hidden.sum() >= HIDDEN
    pick = np.concatenate([rng.permutation(np.argwhere(seen))[:POINTS],
                           rng.permutation(np.argwhere(hidden))[:HIDDEN]])
    points.append(np.stack([CODE * pick[:, 1] + 1.5, CODE * pick[:, 0] + 1.5], -1))
  tok = _tokenizer()
  return tok, jnp.asarray(frames), flow, visible, jnp.asarray(np.stack(points), jnp.float32)


def _check(flow_BxKx2, kl_BxKxhxw, cell_centre_BxKx2, true_flow_BxHxWx2):
  """(fraction of visible points within 2 px of the true cell flow, visible points called
  visible, hidden points called occluded)."""
  truth = counterfactual.cell_flow(true_flow_BxHxWx2, np.asarray(cell_centre_BxKx2), CODE)
  error = np.linalg.norm(np.asarray(flow_BxKx2) - truth, axis=-1)[:, :POINTS]
  occluded = tracking.occluded_by_kl(np.asarray(kl_BxKxhxw).sum((-2, -1)), OCCLUSION_KL)
  return np.mean(error < 2), ~occluded[:, :POINTS], occluded[:, POINTS:]


@pytest.mark.slow
def test_kl_tracing_of_the_oracle_gives_back_the_exact_flow_and_occlusion(clips):
  tok, frames, flow, visible, points = clips
  model = oracle.Oracle.from_flow(tok, _layout(tok), flow, visible)
  out = _trace(model, frames, points)
  within, called_visible, called_occluded = _check(out['flow'], out['kl'], out['cell_centre'],
                                                   flow)
  assert within >= 0.9, within
  assert called_visible.all() and called_occluded.all(), (called_visible, called_occluded)
  # The uncached reference path (whole sequences, no shared KV prefix) reads the same.
  ref = nnx.jit(functools.partial(counterfactual.kl_flow, orders=1, cached=False))(
      model, frames, points)
  np.testing.assert_allclose(np.asarray(ref['flow']), np.asarray(out['flow']), atol=1e-3)


@pytest.mark.slow
def test_a_broken_probe_or_a_model_without_motion_fails_the_same_check(clips):
  tok, frames, flow, visible, points = clips
  layout = _layout(tok)
  model = oracle.Oracle.from_flow(tok, layout, flow, visible)
  # Perturbing the wrong cell (one to the right) while reading from the asked one.
  wrong = _trace(model, frames, jnp.minimum(points + jnp.array([CODE, 0.0]), SIZE - 1))
  asked_BxKx2 = CODE * (np.asarray(points) // CODE) + (CODE - 1) / 2
  kl_Nxhxw = wrong['kl'].reshape((-1,) + wrong['kl'].shape[2:])
  flow_wrong = counterfactual.flow_from_kl(kl_Nxhxw, jnp.asarray(asked_BxKx2.reshape(-1, 2)),
                                           code=CODE).reshape(points.shape)
  within, _, _ = _check(flow_wrong, wrong['kl'], asked_BxKx2, flow)
  assert within < 0.9, within
  # A model that knows no motion (frame 1 = frame 0).
  still = oracle.Oracle.from_flow(tok, layout, np.zeros_like(flow), np.ones_like(visible))
  out = _trace(still, frames, points)
  within, _, called_occluded = _check(out['flow'], out['kl'], out['cell_centre'], flow)
  assert within < 0.9 and not called_occluded.any(), (within, called_occluded)


def _translated(frames_HxWx3, shift_x: int, shift_y: int):
  """Frame 1 = frame 0 moved by (shift_x, shift_y) pixels (wrapping), its flow and visibility
  (what wraps round is not visible)."""
  frame1 = np.roll(frames_HxWx3, (shift_y, shift_x), (0, 1))
  y, x = np.mgrid[:SIZE, :SIZE]
  visible = (x + shift_x < SIZE) & (y + shift_y < SIZE)
  flow = np.broadcast_to(np.array([shift_x, shift_y], np.float32), (SIZE, SIZE, 2))
  return np.stack([frames_HxWx3, frame1]), flow, visible


@pytest.mark.slow
def test_predict_frame_and_move_patch_give_back_a_known_translation(clips):
  tok = clips[0]
  layout = _layout(tok)
  frames, flow, visible = _translated(physics.render(11, SPEC).frames_TxHxWx3[0], 8, 8)
  model = oracle.Oracle.from_flow(tok, layout, flow[None], visible[None])
  frames = jnp.asarray(frames[None])
  codes = np.asarray(model.tokenize(frames))[0]
  truth, copy = codes[1], codes[0]
  known = np.zeros((SIZE // CODE,) * 2, bool)
  known[2:, 2:] = True                                   # cells something lands in
  gw = layout.grid[1]
  revealed = jnp.asarray([[0, 7, 20]], jnp.int32)        # patches (0,0), (1,1), (3,2)
  pred = nnx.jit(functools.partial(counterfactual.predict_frame, decode='argmax'))(
      model, frames, revealed)
  got = np.asarray(pred['codes'])[0]
  np.testing.assert_array_equal(got[known], truth[known])
  assert np.mean(copy[known] == truth[known]) < 0.5      # the answer is not frame 0 again
  shown = np.asarray(pred['hidden'])[0] & np.kron(known, np.ones((CODE, CODE), bool))
  image = np.asarray(tok.detokenize(jnp.asarray(truth[None])))[0]
  np.testing.assert_allclose(np.asarray(pred['image'])[0][shown], image[shown], atol=1e-5)
  # Moving patch (2, 1) of frame 0 to where the motion takes it, (3, 2), gives frame 1 again;
  # to anywhere else, its codes land there instead.
  src = 2 * gw + 1
  move = nnx.jit(functools.partial(counterfactual.move_patch, decode='argmax'))
  for dst, right in ((3 * gw + 2, True), (4 * gw + 4, False)):
    moved = move(model, frames, jnp.asarray([src]), jnp.asarray([dst]),
                 jnp.zeros((1, 0), jnp.int32))
    got = np.asarray(moved['codes'])[0]
    y, x = divmod(dst, gw)
    at_dst = got[2 * y:2 * y + 2, 2 * x:2 * x + 2]
    np.testing.assert_array_equal(at_dst, copy[4:6, 2:4])
    assert np.array_equal(at_dst, truth[2 * y:2 * y + 2, 2 * x:2 * x + 2]) == right
    others = known.copy()
    others[2 * y:2 * y + 2, 2 * x:2 * x + 2] = False
    np.testing.assert_array_equal(got[others], truth[others])
