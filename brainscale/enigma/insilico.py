"""In-silico experiments on a predictive model of visual cortex: MEIs, gratings, sparse noise.

Each takes `respond(frames_BxTxHxW) -> rates_BxTxM`, a JAX function from grey-level videos
(float, 0..255, grey 128) to the rates of M chosen neurons (`enigma_response` for a trained
Enigma, `ln_response` for the LN baseline), and runs batched. A stimulus' response is each
neuron's mean rate over its frames from `settle` on. Angles follow the simulator
(data/synthetic/v1.py): the direction of a grating's wave vector in image axes (x right,
y down), orientations in [0°, 180°), directions in [0°, 360°).
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

GREY = 128.0


def mean_response(respond, frames_BxTxHxW, settle: int) -> jax.Array:
  """[B, M]: each neuron's mean rate over frames settle.. of each stimulus."""
  return respond(frames_BxTxHxW)[:, settle:].mean(1)


def responses(respond, stimuli_SxTxHxW, *, settle: int, batch: int = 32) -> np.ndarray:
  """[S, M] mean responses to many stimuli, `batch` at a time (the last batch padded)."""
  run = jax.jit(lambda x: mean_response(respond, x, settle))
  out = []
  for i in range(0, len(stimuli_SxTxHxW), batch):
    chunk = np.asarray(stimuli_SxTxHxW[i:i + batch], np.float32)
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
    out.append(np.asarray(run(padded))[:len(chunk)])
  return np.concatenate(out)


# ----------------------------------------------------------------------------- MEIs

def _blur(g_MxHxW: jax.Array, sigma: float) -> jax.Array:
  """Gaussian smoothing over the last two axes (separable, reflecting edges)."""
  if sigma <= 0:
    return g_MxHxW
  r = max(1, int(math.ceil(3 * sigma)))
  k = jnp.exp(-0.5 * (jnp.arange(-r, r + 1) / sigma) ** 2)
  k = k / k.sum()
  pad = [(0, 0)] * (g_MxHxW.ndim - 2) + [(r, r), (r, r)]
  x = jnp.pad(g_MxHxW, pad, mode='reflect')
  h, w = g_MxHxW.shape[-2:]
  x = sum(k[i] * x[..., i:i + h, :] for i in range(2 * r + 1))
  return sum(k[i] * x[..., :, i:i + w] for i in range(2 * r + 1))


def _constrain(x_MxTxHxW: jax.Array, contrast: float) -> jax.Array:
  """Each image's deviation from grey rescaled to RMS `contrast` grey levels, then clipped."""
  d = x_MxTxHxW - GREY
  rms = jnp.sqrt(jnp.mean(d ** 2, axis=(1, 2, 3), keepdims=True))
  return jnp.clip(GREY + d * contrast / jnp.maximum(rms, 1e-6), 0, 255)


def mei(respond, shape: tuple[int, int, int], neurons: int, *, steps: int = 200,
        step_size: float = 4.0, contrast: float = 30.0, sigma: float = 1.0, settle: int = 0,
        static: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Most exciting inputs of the `neurons` neurons (batched: neuron m optimises row m).

  Gradient ascent on the stimulus (frames T x H x W; `static`: one image held over them)
  from grey plus a little noise: each step moves `step_size` grey levels on average along
  the Gaussian-smoothed (`sigma` px) gradient of the neuron's mean response, then holds
  the RMS contrast at `contrast` grey levels within [0, 255] (Walker et al. 2019's
  normalised ascent with a contrast constraint). Returns MEIs [M, T, H, W] and the
  responses [M] they drive.
  """
  t, h, w = shape
  rng = np.random.default_rng(seed)
  start = GREY + rng.normal(0, 1, (neurons, 1 if static else t, h, w))
  x = _constrain(jnp.asarray(np.broadcast_to(start, (neurons, 1 if static else t, h, w)),
                             jnp.float32), contrast)

  def objective(x_MxKxHxW):
    video = jnp.broadcast_to(x_MxKxHxW, (neurons, t, h, w))
    rates_MxM = mean_response(respond, video, settle)
    return jnp.trace(rates_MxM), jnp.diagonal(rates_MxM)

  @jax.jit
  def step(x_MxKxHxW):
    g = jax.grad(lambda v: objective(v)[0])(x_MxKxHxW)
    g = _blur(g, sigma)
    g = g / jnp.maximum(jnp.mean(jnp.abs(g), axis=(1, 2, 3), keepdims=True), 1e-12)
    return _constrain(x_MxKxHxW + step_size * g, contrast)

  for _ in range(steps):
    x = step(x)
  video = np.broadcast_to(np.asarray(x), (neurons, t, h, w)).copy()
  return video, np.asarray(jax.jit(lambda v: objective(v)[1])(x))


# ----------------------------------------------------------------------------- gratings

def grating(shape: tuple[int, int, int], direction: float, wavelength: float, *,
            cycles_per_frame: float = 0.1, contrast: float = 1.0, phase: float = 0.0) -> np.ndarray:
  """A drifting sinusoidal grating [T, H, W] (grey levels) moving along `direction` (radians)."""
  t, h, w = shape
  y, x = np.mgrid[:h, :w]
  along = np.cos(direction) * x + np.sin(direction) * y
  angle = (2 * np.pi * (along[None] / wavelength - cycles_per_frame * np.arange(t)[:, None, None])
           + phase)
  return (GREY + contrast * 127 * np.cos(angle)).astype(np.float32)


@dataclasses.dataclass
class Tuning:
  """Direction tuning: curves [M, D] at the best wavelength, and its summary per neuron."""
  directions: np.ndarray        # [D] radians
  wavelengths: np.ndarray       # [L] pixels
  curves: np.ndarray            # [M, D] at each neuron's best wavelength
  all_curves: np.ndarray        # [M, L, D]
  gosi: np.ndarray              # [M] |sum r e^{2i theta}| / sum r
  gdsi: np.ndarray              # [M] |sum r e^{i theta}| / sum r
  orientation: np.ndarray       # [M] preferred, degrees in [0, 180)
  direction: np.ndarray         # [M] preferred, degrees in [0, 360)
  wavelength: np.ndarray        # [M] best, pixels


def tuning(respond, shape: tuple[int, int, int], *, directions: int = 16,
           wavelengths=(8.0, 12.0, 16.0, 24.0), cycles_per_frame: float = 0.1,
           contrast: float = 1.0, settle: int = 0, batch: int = 32) -> Tuning:
  """Responses to drifting gratings of `directions` directions x `wavelengths`; gOSI, gDSI
  and the preferred orientation and direction (vector sums, as the MICrONS foundation model
  reports them) at each neuron's best wavelength (the one of its largest response)."""
  theta_D = 2 * np.pi * np.arange(directions) / directions
  wavelengths = np.asarray(wavelengths, np.float64)
  stimuli = np.stack([grating(shape, th, lam, cycles_per_frame=cycles_per_frame,
                              contrast=contrast) for lam in wavelengths for th in theta_D])
  r_LxDxM = responses(respond, stimuli, settle=settle, batch=batch).reshape(
      len(wavelengths), directions, -1)
  r_MxLxD = r_LxDxM.transpose(2, 0, 1)
  best_M = np.argmax(r_MxLxD.max(2), 1)
  r_MxD = r_MxLxD[np.arange(len(best_M)), best_M]
  r = np.maximum(r_MxD - r_MxD.min(1, keepdims=True), 0)    # above the curve's floor
  total = np.maximum(r.sum(1), 1e-12)
  second, first = r @ np.exp(2j * theta_D), r @ np.exp(1j * theta_D)
  return Tuning(theta_D, wavelengths, r_MxD, r_MxLxD, np.abs(second) / total,
                np.abs(first) / total, np.degrees(np.angle(second) / 2) % 180,
                np.degrees(np.angle(first)) % 360, wavelengths[best_M])


# ----------------------------------------------------------------------------- sparse noise

@dataclasses.dataclass
class ReceptiveField:
  """Sparse-noise maps [M, h, w] (one value per dot position) and RF centres [M, 2] (x, y px)."""
  on: np.ndarray
  off: np.ndarray
  strength: np.ndarray          # |on - grey| + |off - grey|
  centre: np.ndarray
  dot: int


def sparse_noise(respond, shape: tuple[int, int, int], *, dot: int = 4, settle: int = 0,
                 batch: int = 32) -> ReceptiveField:
  """A white (255) and a black (0) dot of `dot` x `dot` pixels at every place of a grid, each
  held on grey for the stimulus' frames; the RF centre is the mean dot position weighted by
  the squared response change (Walker et al.'s Gaussian-envelope centre)."""
  t, h, w = shape
  gh, gw = h // dot, w // dot
  stimuli = np.full((2 * gh * gw + 1, t, h, w), GREY, np.float32)
  for i in range(gh):
    for j in range(gw):
      for s, level in enumerate((255.0, 0.0)):
        stimuli[s * gh * gw + i * gw + j, :, i * dot:(i + 1) * dot, j * dot:(j + 1) * dot] = level
  r_SxM = responses(respond, stimuli, settle=settle, batch=batch)
  grey_M = r_SxM[-1]
  on_Mxhxw = r_SxM[:gh * gw].T.reshape(-1, gh, gw)
  off_Mxhxw = r_SxM[gh * gw:2 * gh * gw].T.reshape(-1, gh, gw)
  strength = np.abs(on_Mxhxw - grey_M[:, None, None]) + np.abs(off_Mxhxw - grey_M[:, None, None])
  weight = strength ** 2
  y, x = (np.mgrid[:gh, :gw] + 0.5) * dot - 0.5                # dot centres, pixels
  total = np.maximum(weight.sum((1, 2)), 1e-30)
  centre = np.stack([(weight * x).sum((1, 2)) / total, (weight * y).sum((1, 2)) / total], -1)
  return ReceptiveField(on_Mxhxw, off_Mxhxw, strength, centre, dot)


# ----------------------------------------------------------------------------- models

def ln_response(ln, neurons) -> callable:
  """The LN baseline (enigma/baselines.py) of `neurons` as a JAX function of grey levels."""
  idx = np.asarray(neurons)
  w_ExM = jnp.asarray(ln.w_ExN[:, idx], jnp.float32)
  a, b, c = (jnp.asarray(v[idx], jnp.float32) for v in (ln.a_N, ln.b_N, ln.c_N))

  def respond(frames_BxTxHxW):
    bsz, t, h, w = frames_BxTxHxW.shape
    p = ln.pool
    x = frames_BxTxHxW.reshape(bsz, t, h // p, p, w // p, p).mean((3, 5)) / 127.5 - 1
    x_BxTxP = x.reshape(bsz, t, -1)
    lagged = [jnp.pad(x_BxTxP, ((0, 0), (lag, 0), (0, 0)))[:, :t] for lag in range(ln.lags)]
    d_BxTxE = jnp.concatenate(lagged + [jnp.ones((bsz, t, 1))], -1)
    z_BxTxM = d_BxTxE @ w_ExM
    return a * jax.nn.softplus(b * z_BxTxM + c)
  return respond


def enigma_response(model, session, neurons, c) -> callable:
  """A trained Enigma's encoding prediction (stimulus only; behaviour held at the session's
  mean) of `neurons` (local indices, at most data.max_neurons) of `session`, for videos of
  data.window frames."""
  from brainscale.data import neural  # noqa: PLC0415
  from brainscale.enigma import masking  # noqa: PLC0415
  neurons = np.asarray(neurons)
  start = int(session.trials['start'][0])
  template = neural.example(session, start, c.data.window, neurons=neurons,
                            max_neurons=c.data.max_neurons)
  template['behavior'] = np.zeros_like(template['behavior'])
  template['behavior_mask'] = np.ones_like(template['behavior_mask'])
  template['frames_mask'] = np.ones_like(template['frames_mask'])
  m = len(neurons)

  def respond(frames_BxTxHxW):
    b = frames_BxTxHxW.shape[0]
    batch = {k: jnp.broadcast_to(jnp.asarray(v), (b,) + np.shape(v)) for k, v in template.items()}
    batch['frames'] = frames_BxTxHxW
    rates_BxWxM, _ = model(batch, masking.fixed(batch, 'encoding'))
    return rates_BxWxM[:, :, :m]
  return respond


# ----------------------------------------------------------------------------- ground truth

def angle_error(a_deg, b_deg, period: float = 180.0) -> np.ndarray:
  """|a - b| on a circle of `period` degrees."""
  return np.abs((np.asarray(a_deg) - b_deg + period / 2) % period - period / 2)


def session_estimates(model, session, c, *, settle: int | None = None) -> dict:
  """Tuning and sparse-noise RF of every neuron of `session` (groups of data.max_neurons),
  and its cc_norm on the repeated trials: arrays [N]."""
  from brainscale.enigma import evaluation, metrics  # noqa: PLC0415
  t, (h, w) = c.data.window, tuple(c.data.frame_shape)
  settle = t // 3 if settle is None else settle
  n, step = session.num_neurons, c.data.max_neurons
  parts = []
  for lo in range(0, n, step):
    respond = enigma_response(model, session, np.arange(lo, min(lo + step, n)), c)
    tun = tuning(respond, (t, h, w), settle=settle, batch=c.evaluation.batch)
    rf = sparse_noise(respond, (t, h, w), settle=settle, batch=c.evaluation.batch)
    parts.append((tun.orientation, tun.direction, tun.gosi, tun.gdsi, tun.wavelength, rf.centre))
  repeats = session.trials_of(('repeats',))
  enc = [evaluation.predict_trial(model, session, k, c)[0] for k in repeats]
  resp = [session.read(int(session.trials['start'][k]), int(session.trials['stop'][k]))[
      'responses'] for k in repeats]
  cc = metrics.cc_norm(enc, resp, np.asarray(session.trials['stimulus'])[repeats],
                       skip=c.evaluation.skip)
  keys = ('orientation', 'direction', 'gosi', 'gdsi', 'wavelength', 'centre')
  return {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(keys)} | {'cc_norm': cc}


def against_truth(estimates: dict, truth: dict, *, min_cc: float = 0.5) -> dict:
  """Median preferred-orientation error (degrees) and RF-centre error (pixels) of the
  neurons with cc_norm >= min_cc: simple and complex cells apart, and together ('both'),
  with their counts."""
  ori_err = angle_error(estimates['orientation'], np.asarray(truth['orientation']))
  rf_err = np.linalg.norm(estimates['centre'] - np.asarray(truth['centre']), axis=-1)
  good = np.nan_to_num(estimates['cc_norm'], nan=-1) >= min_cc
  out = {}
  kinds = np.asarray(truth['type'])
  for kind in ('simple', 'complex', 'both'):
    mine = good if kind == 'both' else good & (kinds == kind)
    out[kind] = {'neurons': int(mine.sum()),
                 'orientation_error_deg': float(np.median(ori_err[mine])) if mine.any() else None,
                 'rf_centre_error_px': float(np.median(rf_err[mine])) if mine.any() else None}
  return out


def main(argv=None) -> int:
  """python -m brainscale.enigma.insilico --workdir=RUN [--sessions=a,b] [--min_cc=0.5]:
  a trained Enigma's in-silico tuning and RFs against the simulator's truth.json."""
  parser = argparse.ArgumentParser(prog='python -m brainscale.enigma.insilico',
                                   description=main.__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='an Enigma run folder (newest checkpoint)')
  parser.add_argument('--sessions', default='', help="comma-separated; default the run's eval "
                      'sessions')
  parser.add_argument('--min_cc', type=float, default=0.5)
  parser.add_argument('--out', default='', help='write the comparison as JSON here')
  args = parser.parse_args(argv)
  from brainscale import inspect  # noqa: PLC0415  (the CLI loads a checkpoint, as launch/ does)
  from brainscale.data.synthetic import v1  # noqa: PLC0415
  from brainscale.enigma import data  # noqa: PLC0415
  try:
    run = inspect.load(args.workdir)
    c = run.config
    store = data.open_store(c)
    truth_path = pathlib.Path(store.root) / v1.TRUTH_FILE
    if not truth_path.is_file():
      raise ValueError(f'{truth_path} does not exist: the store is not a simulated population '
                       '(or predates truth.json; regenerate it)')
    truths = json.loads(truth_path.read_text())
    names = args.sessions.split(',') if args.sessions else data.sessions(c, store)
    per_session, pooled = {}, {'estimates': [], 'truth': []}
    for name in names:
      session = store.session(name)
      est = session_estimates(run.model, session, c)
      if truths[name]['unit_ids'] != [str(u) for u in session.unit_ids]:
        raise ValueError(f'{truth_path}: the neurons of {name} are not the store\'s')
      per_session[name] = against_truth(est, truths[name], min_cc=args.min_cc)
      pooled['estimates'].append(est)
      pooled['truth'].append(truths[name])
  except (ValueError, OSError) as e:
    print(f'brainscale: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  est = {k: np.concatenate([e[k] for e in pooled['estimates']]) for k in pooled['estimates'][0]}
  tru = {k: sum((t[k] for t in pooled['truth']), []) for k in ('orientation', 'centre', 'type')}
  per_neuron = {'cc_norm': est['cc_norm'], 'orientation': est['orientation'],
                'gosi': est['gosi'], 'centre': est['centre'],
                'true_orientation': np.asarray(tru['orientation']),
                'true_centre': np.asarray(tru['centre']), 'type': tru['type']}
  result = {'all': against_truth(est, tru, min_cc=args.min_cc), 'sessions': per_session,
            'per_neuron': {k: np.asarray(v).tolist() for k, v in per_neuron.items()},
            'step': run.step, 'min_cc': args.min_cc,
            'neurons_cc_norm_median': float(np.nanmedian(est['cc_norm']))}
  for kind, r in result['all'].items():
    print(f'{kind:8s} neurons {r["neurons"]:4d} | median orientation error '
          f'{r["orientation_error_deg"]} deg | median RF centre error {r["rf_centre_error_px"]} px')
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
