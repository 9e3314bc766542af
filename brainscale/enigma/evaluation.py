"""Scores a trained Enigma on held-out repeated trials, next to a fitted LN baseline.

Each trial is predicted in overlapping windows (every sample after the first
window keeps half a window of context) over all of its session's neurons, in
groups of `data.max_neurons`. Encoding sees the stimulus and behaviour;
behaviour decoding sees the stimulus and every neuron.
"""

import functools

import jax
import numpy as np
from flax import nnx

from brainscale.data import neural
from brainscale.enigma import baselines, masking, metrics


def window_starts(length: int, window: int) -> list[tuple[int, int]]:
  """(start, first sample to keep) of the windows that cover a trial of `length` samples."""
  if length < window:
    raise ValueError(f'a trial of {length} samples is shorter than the window of {window}')
  out, done, keep = [(0, 0)], window, window // 2
  while done < length:
    start = min(done - keep, length - window)
    out.append((start, done - start))
    done = start + window
  return out


@functools.partial(nnx.jit, static_argnums=2)
def _forward(model, batch, task: str):
  return model(batch, masking.fixed(batch, task))


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def predict_trial(model, session, trial: int, c) -> tuple[np.ndarray, np.ndarray]:
  """One trial's rates [T, N] by encoding (all neurons, normalised units) and behaviour [T, C]
  by behaviour decoding, from the same windows."""
  d = c.data
  start, stop = (int(session.trials[k][trial]) for k in ('start', 'stop'))
  n = session.num_neurons
  groups = [np.arange(i, min(i + d.max_neurons, n)) for i in range(0, n, d.max_neurons)]
  jobs = [(s, keep, g) for s, keep in window_starts(stop - start, d.window) for g in groups]
  rates_TxN = np.zeros((stop - start, n), np.float32)
  behavior_TxC = np.zeros((stop - start, len(neural.CHANNELS)), np.float32)
  for i in range(0, len(jobs), c.evaluation.batch):
    chunk = jobs[i:i + c.evaluation.batch]
    batch = _stack([neural.example(session, start + s, d.window, neurons=g,
                                   max_neurons=d.max_neurons) for s, _, g in chunk])
    rates_BxWxM = jax.device_get(_forward(model, batch, 'encoding')[0])
    behavior_BxWxC = jax.device_get(_forward(model, batch, 'behavior')[1])
    for (s, keep, g), r_WxM, b_WxC in zip(chunk, rates_BxWxM, behavior_BxWxC):
      rates_TxN[s + keep:s + d.window, g] = r_WxM[keep:, :len(g)]
      behavior_TxC[s + keep:s + d.window] = b_WxC[keep:]
  return rates_TxN, behavior_TxC


def _trial_data(session, trial: int) -> dict:
  start, stop = (int(session.trials[k][trial]) for k in ('start', 'stop'))
  return session.read(start, stop)


def _ln_baseline(session, frames: list[np.ndarray], c) -> list[np.ndarray]:
  """LN predictions for these trials' frames, fitted on the session's train trials."""
  train = [_trial_data(session, t) for t in session.trials_of(('train',))]
  ln = baselines.fit_ln([x['frames'] for x in train], [x['responses'] for x in train],
                        lags=c.evaluation.ln_lags, pool=c.evaluation.ln_pool, seed=c.seed)
  return ln.predict(frames)


def score_session(model, session, c) -> dict[str, np.ndarray]:
  """Per-neuron metrics of one session (arrays) and per-channel behaviour R^2."""
  repeats = session.trials_of(('repeats',))
  if len(repeats) == 0:
    return {}
  skip = c.evaluation.skip
  data = [_trial_data(session, t) for t in repeats]
  responses = [x['responses'] for x in data]
  stimulus_K = np.asarray(session.trials['stimulus'])[repeats]
  enc, dec = map(list, zip(*[predict_trial(model, session, t, c) for t in repeats]))
  target = [(x['behavior'] - session.behavior_mean) / session.behavior_std for x in data]
  ok = [np.isfinite(t) for t in target]
  ln = _ln_baseline(session, [x['frames'] for x in data], c)
  return {
      'single_trial_corr': metrics.single_trial_corr(enc, responses, skip=skip),
      'corr_to_average': metrics.repeat_average_corr(enc, responses, stimulus_K, skip=skip),
      'cc_norm': metrics.cc_norm(enc, responses, stimulus_K, skip=skip),
      'ln_baseline_cc_norm': metrics.cc_norm(ln, responses, stimulus_K, skip=skip),
      'ln_baseline_single_trial_corr': metrics.single_trial_corr(ln, responses, skip=skip),
      'behavior_r2': metrics.r2(np.concatenate(dec), np.nan_to_num(np.concatenate(target)),
                                np.concatenate(ok)),
  }


def evaluate(model, store, sessions: list[str], c) -> dict[str, float]:
  """Metrics pooled over the neurons (channels) of `sessions`, NaN-free means."""
  scores = [score_session(model, store.session(name), c) for name in sessions]
  scores = [s for s in scores if s]
  if not scores:
    return {}
  return {k: float(np.nanmean(np.concatenate([s[k] for s in scores]))) for k in scores[0]}
