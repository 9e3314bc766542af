"""CWM end to end on a tiny trained model: prerequisite tokenizer, training, eval, probes."""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale.cwm import counterfactual, decoding, sequence
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ['--config.data.synthetic.count=12', '--config.data.eval_synthetic.count=4',
        '--config.data.workers=0', '--config.train.batch_size=4', '--config.train.eval_batches=1',
        '--config.checkpoint.every_steps=1000', '--config.train.log_every=5']
TOKENIZER = DATA + ['--config.train.steps=30']
WORLD = DATA + ['--config.train.steps=12', '--config.model.layers=2', '--config.model.dim=64',
                '--config.model.heads=4', '--config.model.head_dim=16',
                '--config.model.mlp_hidden=256', '--config.probe.clips=4',
                '--config.probe.batch=2', '--config.probe.flow_points=2']


def run_cli(*args, env=None, timeout=900):
  return subprocess.run([sys.executable, str(ROOT / 'launch' / 'run.py'), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _config():
  return config_lib.resolve('cwm_tiny', WORLD + [
      f'--config.tokenizer.overrides={tuple(TOKENIZER)!r}'])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """cwm_tiny shrunk: trains its tokenizer first, then the world model, then evaluates."""
  tmp = tmp_path_factory.mktemp('cwm')
  env = {**os.environ, 'BRAINSCALE_DATA': str(tmp / 'data'), 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags()}
  workdir = tmp / 'run'
  overrides = [a for a in WORLD] + [f'--config.tokenizer.overrides={tuple(TOKENIZER)!r}']
  out = run_cli('--experiment=cwm_tiny', f'--workdir={workdir}', *overrides, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out.stdout + out.stderr, env, overrides


def _model(workdir):
  c = _config()
  setup = step_lib.build(c)
  checkpoints = Checkpoints(str(workdir), keep=3, async_save=False)
  state = checkpoints.restore(checkpoints.latest(), setup.abstract_state)
  checkpoints.close()
  return nnx.merge(setup.graphdef, state['params']), setup


@pytest.mark.slow
def test_trains_tokenizer_first_then_world_model_with_it_frozen(trained):
  workdir, log, env, overrides = trained
  assert 'prerequisite tokenizer: cwm_tokenizer_tiny' in log
  assert 'rendering 12 synthetic clips' in log
  assert (workdir / 'tokenizer' / 'checkpoints' / '30').is_dir()
  assert (workdir / 'checkpoints' / '12').is_dir()
  # The world model's tokenizer is the prerequisite's final tokenizer, unchanged by training.
  tok_config = config_lib.resolve('cwm_tokenizer_tiny', list(eval(overrides[-1].split('=', 1)[1])))
  tok_setup = step_lib.build(tok_config)
  ck = Checkpoints(str(workdir / 'tokenizer'), keep=3, async_save=False)
  tok_params = ck.restore(30, tok_setup.abstract_state)['params']
  ck.close()
  model, _ = _model(workdir)
  _, wm_tok = nnx.split(model.tokenizer, nnx.Param)
  wm_tok = step_lib.param_tree(wm_tok, lambda v: v[...])
  jax.tree.map(np.testing.assert_array_equal, wm_tok, jax.device_get(tok_params))
  # eval prints every probe metric
  out = run_cli('--experiment=cwm_tiny', f'--workdir={workdir}', '--mode=eval', *overrides,
                env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in (out.stdout + out.stderr).splitlines() if l.startswith('eval step'))
  for name in ('next_frame_psnr', 'copy_frame_psnr', 'tokenizer_psnr', 'flow_epe',
               'zero_flow_epe', 'nll_frame1'):
    assert f'{name} ' in line, line
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval/flow_epe' in r for r in rows)


@pytest.fixture(scope='module')
def probe_inputs(trained):
  workdir, _, env, _ = trained
  saved = os.environ.get('BRAINSCALE_DATA')
  os.environ['BRAINSCALE_DATA'] = env['BRAINSCALE_DATA']   # the clips the run rendered
  try:
    model, setup = _model(workdir)
    batch = setup.task.eval_data(0, 1)[0]
  finally:
    if saved is None:
      del os.environ['BRAINSCALE_DATA']
    else:
      os.environ['BRAINSCALE_DATA'] = saved
  return model, jnp.asarray(batch['frames'][:2])


@pytest.mark.slow
def test_parallel_decoding_equals_one_query_at_a_time(probe_inputs):
  """The shared-prefix mask: each query sees the context and itself, nothing else."""
  model, frames = probe_inputs
  layout = model.layout
  p = layout.patches
  codes = model.tokenize(frames)
  context = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (2, p)),
                             p + jnp.broadcast_to(jnp.arange(0, p, 2), (2, p // 2))], 1)
  queries = p + jnp.broadcast_to(jnp.array([1, 7, 13]), (2, 3))
  tok, logp = decoding.decode_patches(model, codes, context, queries)
  for k in range(3):
    tok_k, logp_k = decoding.decode_patches(model, codes, context, queries[:, k:k + 1])
    np.testing.assert_array_equal(tok[:, k], tok_k[:, 0])
    np.testing.assert_allclose(logp[:, k], logp_k[:, 0], atol=2e-4)
  # Sequential: the first query sees only the context (same as parallel); later ones differ.
  tok_s, logp_s = decoding.decode_patches(model, codes, context, queries, sequential=True)
  np.testing.assert_allclose(logp_s[:, 0], logp[:, 0], atol=2e-4)
  assert not np.allclose(logp_s[:, 2], logp[:, 2], atol=1e-4)
  # Teacher forcing: conditioning on given tokens reproduces a chosen run exactly.
  _, logp_t = decoding.decode_patches(model, codes, context, queries, teacher_BxQx4=tok)
  np.testing.assert_allclose(logp_t, logp, atol=2e-4)
  assert np.allclose(np.exp(logp).sum(-1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_predict_frame_keeps_revealed_patches_and_returns_images(probe_inputs):
  model, frames = probe_inputs
  layout = model.layout
  revealed = jnp.asarray(np.stack([np.arange(0, layout.patches, 3)] * 2), jnp.int32)
  codes = model.tokenize(frames)
  for decode in ('mean', 'argmax', 'sample'):
    out = counterfactual.predict_frame(model, frames, revealed, decode=decode,
                                       key=jax.random.key(1))
    image = np.asarray(out['image'])
    assert image.shape == (2, layout.height, layout.width, 3)
    assert image.min() >= 0 and image.max() <= 1
    content = np.asarray(sequence.patchify(out['codes'][:, None], sequence.Layout(
        layout.height, layout.width, layout.codebook, frames=1)))
    truth = np.asarray(sequence.patchify(codes, layout))[:, layout.patches:]
    np.testing.assert_array_equal(content[:, np.asarray(revealed[0])],
                                  truth[:, np.asarray(revealed[0])])
    hidden = np.asarray(out['hidden'])
    assert hidden.mean() == pytest.approx(1 - revealed.shape[1] / layout.patches)
  seq = counterfactual.predict_frame(model, frames, revealed, sequential=True, decode='argmax')
  assert seq['image'].shape == (2, layout.height, layout.width, 3)


@pytest.mark.slow
def test_move_patch_and_perturb(probe_inputs):
  model, frames = probe_inputs
  layout = model.layout
  out = counterfactual.move_patch(model, frames, jnp.array([9, 9]), jnp.array([27, 30]),
                                  jnp.asarray([[0, 1, 2]] * 2, jnp.int32), decode='argmax')
  codes0 = np.asarray(sequence.patchify(model.tokenize(frames), layout))[:, 9]
  got = np.asarray(sequence.patchify(out['codes'][:, None], sequence.Layout(
      layout.height, layout.width, layout.codebook, frames=1)))
  np.testing.assert_array_equal(got[0, 27], codes0[0])
  np.testing.assert_array_equal(got[1, 30], codes0[1])
  pert = np.asarray(counterfactual.perturb(frames[:, 0], jnp.array([[[5.0, 9.0]]] * 2)))
  assert pert.shape == (2, 1, layout.height, layout.width, 3)
  diff = pert[:, 0] != np.asarray(frames[:, 0])
  assert not diff[:, :8].any() and not diff[:, 12:].any() and not diff[:, :, 8:].any()
  np.testing.assert_array_equal(pert[:, 0, 8:12, 4:8], 255 - np.asarray(frames[:, 0, 8:12, 4:8]))


@pytest.mark.slow
def test_frame1_log_probs_are_the_teacher_forced_predictions_in_order(probe_inputs):
  model, frames = probe_inputs
  layout = model.layout
  p = layout.patches
  codes = model.tokenize(frames)
  order = sequence.random_order(jax.random.key(3), 2, layout)
  logp = np.asarray(counterfactual.frame1_log_probs(model, codes, order))
  assert logp.shape == (2, p, 4, layout.codebook)
  true = np.asarray(sequence.patchify(codes, layout))[:, p:]
  for slot in (0, 7, p - 1):   # the frame-1 patch at this slot, after frame 0 and slots before it
    patch = np.asarray(order[:, p + slot] - p)
    rows = np.arange(2)
    _, one = decoding.decode_patches(
        model, codes, order[:, :p + slot], order[:, p + slot:p + slot + 1],
        teacher_BxQx4=jnp.asarray(true[rows, patch][:, None]))
    np.testing.assert_allclose(logp[rows, patch], np.asarray(one)[:, 0], atol=2e-4)


def test_flow_from_kl_reads_the_mass_above_the_floor():
  from_2x2 = jnp.array([[5.5, 9.5], [5.5, 9.5]])
  kl_2x6x8 = np.full((2, 6, 8), 0.3, np.float32)        # a noise floor everywhere
  kl_2x6x8[0, 4, 3] += 2.0                               # one bump: cell (x 3, y 4)
  kl_2x6x8[1, 1, 6] += 3.0                               # two bumps, 3:1
  kl_2x6x8[1, 5, 0] += 1.0
  flow = np.asarray(counterfactual.flow_from_kl(jnp.asarray(kl_2x6x8), from_2x2))
  np.testing.assert_allclose(flow[0], [4 * 3 + 1.5 - 5.5, 4 * 4 + 1.5 - 9.5], atol=1e-5)
  to_x, to_y = (3 * 25.5 + 1 * 1.5) / 4, (3 * 5.5 + 1 * 21.5) / 4
  np.testing.assert_allclose(flow[1], [to_x - 5.5, to_y - 9.5], atol=1e-5)
  # floor=0 keeps everything above the minimum: a direct numpy centroid
  raw = np.asarray(counterfactual.flow_from_kl(jnp.asarray(kl_2x6x8), from_2x2, floor=0.0))
  mass = kl_2x6x8[0] - kl_2x6x8[0].min()
  ys, xs = np.mgrid[0:6, 0:8] * 4 + 1.5
  np.testing.assert_allclose(raw[0], [(mass * xs).sum() / mass.sum() - 5.5,
                                      (mass * ys).sum() / mass.sum() - 9.5], atol=1e-4)
  # a flat map carries no evidence of motion
  flat = counterfactual.flow_from_kl(jnp.full((1, 6, 8), 0.7), from_2x2[:1])
  np.testing.assert_array_equal(np.asarray(flat), 0.0)
  with pytest.raises(ValueError, match='floor=1'):
    counterfactual.flow_from_kl(jnp.asarray(kl_2x6x8), from_2x2, floor=1)


@pytest.mark.slow
def test_kl_flow_maps_and_flow(probe_inputs):
  model, frames = probe_inputs
  layout = model.layout
  w = layout.width
  points = jnp.array([[[10.0, 30.0], [w - 4.0, 2.0]], [[33.0, 33.0], [1.0, 1.0]]])
  out = counterfactual.kl_flow(model, frames, points, orders=2)
  kl = np.asarray(out['kl'])
  assert kl.shape == (2, 2, layout.height // 4, layout.width // 4)
  assert (kl >= -1e-5).all() and (kl.max((2, 3)) > 0).all()
  # the map averages the orders: one order's map differs from the two-order mean
  one = np.asarray(counterfactual.kl_flow(model, frames, points, orders=1)['kl'])
  assert not np.allclose(one, kl)
  np.testing.assert_allclose(np.asarray(out['cell_centre'])[0, 0], [9.5, 29.5])
  flow = np.asarray(out['flow'])
  assert flow.shape == (2, 2, 2) and np.isfinite(flow).all()
  centre = np.asarray(out['cell_centre'])
  to = centre + flow      # lands inside the frame, on the KL-weighted codes
  assert (to >= 1.5 - 1e-4).all() and (to <= w - 2.5 + 1e-4).all()
  # the flow is the readout of the returned map
  np.testing.assert_allclose(
      flow.reshape(4, 2),
      np.asarray(counterfactual.flow_from_kl(jnp.asarray(kl.reshape(4, *kl.shape[2:])),
                                             jnp.asarray(centre.reshape(4, 2)))), atol=1e-4)
  # a point off the frame is clipped to the edge cell
  off = counterfactual.kl_flow(model, frames[:1], jnp.array([[[w + 50.0, -9.0]]]))
  np.testing.assert_allclose(np.asarray(off['cell_centre'])[0, 0], [w - 2.5, 1.5])
  with pytest.raises(ValueError, match='orders=0'):
    counterfactual.kl_flow(model, frames, points, orders=0)


@pytest.mark.slow
def test_tracking_command_scores_a_davis_layout_pickle(trained, tmp_path):
  """python -m brainscale.cwm.tracking on the trained run: a TAP-Vid DAVIS-layout pickle
  (frames larger than the model's) under the gap protocol, the model beside the baselines;
  a pickle that would call a function is refused in one line."""
  workdir, _, env, _ = trained
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (7, 96, 128, 3), dtype=np.uint8)
  points = rng.uniform(0.1, 0.9, (3, 7, 2)).astype(np.float32)
  (tmp_path / 'davis.pkl').write_bytes(pickle.dumps(
      {'clip': {'video': frames, 'points': points, 'occluded': np.zeros((3, 7), bool)}}))
  command = [sys.executable, '-m', 'brainscale.cwm.tracking', f'--workdir={workdir}',
             f'--data={tmp_path / "davis.pkl"}', '--protocol=gap', '--orders=1',
             f'--out={tmp_path / "scores.json"}']
  out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  scores = json.loads((tmp_path / 'scores.json').read_text())
  assert set(scores) == {'model', 'zero_motion', 'copy_position'}
  assert all(0 <= v <= 100 for m in scores.values() for v in m.values()), scores
  assert 'AJ' in out.stdout and '1 videos, protocol gap' in out.stdout
  (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(os.system))
  command[4] = f'--data={tmp_path / "evil.pkl"}'
  out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert out.returncode == 2 and out.stderr.strip().count('\n') == 0, out.stderr
  assert 'refuses posix.system' in out.stderr or 'refuses os.system' in out.stderr, out.stderr
