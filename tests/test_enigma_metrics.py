"""Tests of brainscale.enigma.metrics and the LN baseline against slow, obvious numpy loops.

Every test draws fresh random data from its own seed (`rng` fixture): variable-length trials,
missing (NaN) samples, stimuli shown once or many times. CC_norm is also checked against
Schoppe's formula, for unbiasedness, and on simulated Poisson repeats.
"""

import numpy as np
import pytest

from brainscale.enigma import baselines, metrics

CLOSE = dict(rtol=1e-9, atol=1e-12)


def corr_loop(x, y) -> float:
  """Pearson correlation of two 1-D sequences over the pairs without NaN; 0 when undefined."""
  pairs = [(a, b) for a, b in zip(x, y) if not (np.isnan(a) or np.isnan(b))]
  if len(pairs) < 2 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
    return 0.0
  a, b = np.array(pairs).T
  return float(np.corrcoef(a, b)[0, 1])


def random_trials(rng, lengths, n, nan=0.0) -> list[np.ndarray]:
  trials = [rng.standard_normal((t, n)) for t in lengths]
  return [np.where(rng.random(t.shape) < nan, np.nan, t) for t in trials]


# ------------------------------------------------------------------------------------ pearson

def test_pearson_matches_loop_with_nan_and_degenerate_columns(rng):
  t, n = 40, 6
  x, y = rng.standard_normal((t, n)), rng.standard_normal((t, n))
  y[rng.random((t, n)) < 0.2] = np.nan
  x[:, 1] = 0.1                                      # constant
  y[1:, 2] = np.nan                                  # one pair only
  y[:, 3] = np.where(np.isnan(y[:, 3]), np.nan, 7.0)  # constant where present
  want = [corr_loop(x[:, j], y[:, j]) for j in range(n)]
  np.testing.assert_allclose(metrics.pearson(x, y), want, **CLOSE)
  assert metrics.pearson(x, y)[1:4].tolist() == [0, 0, 0]


def test_pearson_rejects_mismatched_shapes(rng):
  with pytest.raises(ValueError, match=r'pearson of shapes \(5, 3\) and \(5, 2\)'):
    metrics.pearson(rng.standard_normal((5, 3)), rng.standard_normal((5, 2)))


# -------------------------------------------------------------------------- single-trial corr

def single_trial_loop(pred, resp, skip):
  n = pred[0].shape[1]
  out = []
  for j in range(n):
    xs, ys = [], []
    for p, r in zip(pred, resp):
      for t in range(skip, len(r)):
        xs.append(p[t, j])
        ys.append(r[t, j])
    out.append(corr_loop(xs, ys))
  return np.array(out)


@pytest.mark.parametrize('layout', ['array', 'lists'])
def test_single_trial_corr_matches_loop(rng, layout):
  lengths = [60] * 5 if layout == 'array' else list(rng.integers(12, 70, 6))
  skip = int(rng.integers(0, 12))
  resp = random_trials(rng, lengths, 7, nan=0.1)
  pred = [np.nan_to_num(r) + rng.standard_normal(r.shape) for r in resp]
  if layout == 'array':
    pred, resp = np.stack(pred), np.stack(resp)
  np.testing.assert_allclose(metrics.single_trial_corr(pred, resp, skip=skip),
                             single_trial_loop(pred, resp, skip), **CLOSE)


def test_single_trial_corr_skip_drops_the_first_frames(rng):
  resp = random_trials(rng, [30, 40], 3)
  pred = [r.copy() for r in resp]
  for p in pred:
    p[:10] = rng.standard_normal((10, 3))             # garbage only where skipped
  np.testing.assert_allclose(metrics.single_trial_corr(pred, resp, skip=10), 1, **CLOSE)
  assert np.all(metrics.single_trial_corr(pred, resp, skip=0) < 1 - 1e-6)


def test_single_trial_corr_rejects_bad_inputs(rng):
  resp = random_trials(rng, [30, 50], 4)
  with pytest.raises(ValueError, match='trial 0 has 30 frames, skip=30'):
    metrics.single_trial_corr(resp, resp, skip=30)
  with pytest.raises(ValueError, match=r'pred\[1\] has shape \(50, 3\), resp\[1\] has \(50, 4\)'):
    metrics.single_trial_corr([resp[0], resp[1][:, :3]], resp, skip=5)
  with pytest.raises(ValueError, match='pred has 1 trials, resp has 2'):
    metrics.single_trial_corr(resp[:1], resp, skip=5)


# ------------------------------------------------------------------------- repeat-average corr

def repeated_session(rng, n, nan=0.0):
  """Trials of stimuli shown 1 to 4 times (a signal per stimulus plus noise), lengths differing
  between stimuli; predictions are the signal plus other noise."""
  shows = {s: int(rng.integers(1, 5)) for s in range(6)}
  shows[0], shows[1] = 1, 3                          # at least one single and one repeat
  signal = {s: rng.standard_normal((int(rng.integers(20, 45)), n)) for s in shows}
  stimulus_K = rng.permutation([s for s in shows for _ in range(shows[s])])
  resp = [signal[s] + rng.standard_normal(signal[s].shape) for s in stimulus_K]
  resp = [np.where(rng.random(r.shape) < nan, np.nan, r) for r in resp]
  pred = [signal[s] + rng.standard_normal(signal[s].shape) for s in stimulus_K]
  return pred, resp, list(stimulus_K)


def repeat_average_loop(pred, resp, stimulus_K, skip):
  n = resp[0].shape[1]
  out = []
  for j in range(n):
    xs, ys = [], []
    for s in sorted(set(stimulus_K)):
      ks = [k for k, sk in enumerate(stimulus_K) if sk == s]
      if len(ks) < 2:
        continue
      for t in range(skip, len(resp[ks[0]])):
        ys_t = [resp[k][t, j] for k in ks if not np.isnan(resp[k][t, j])]
        ys.append(np.mean(ys_t) if ys_t else np.nan)
        xs.append(np.mean([pred[k][t, j] for k in ks]))
    out.append(corr_loop(xs, ys))
  return np.array(out)


def test_repeat_average_corr_matches_loop(rng):
  pred, resp, stimulus_K = repeated_session(rng, 5, nan=0.3)
  skip = int(rng.integers(0, 15))
  np.testing.assert_allclose(metrics.repeat_average_corr(pred, resp, stimulus_K, skip=skip),
                             repeat_average_loop(pred, resp, stimulus_K, skip), **CLOSE)


def test_repeats_need_equal_lengths_and_some_repeat(rng):
  resp = random_trials(rng, [30, 31, 30], 2)
  with pytest.raises(ValueError, match='stimulus 7 has repeats of shapes'):
    metrics.repeat_average_corr(resp, resp, [7, 7, 8], skip=5)
  with pytest.raises(ValueError, match='no stimulus in stimulus_K is shown twice'):
    metrics.cc_norm(resp, resp, [1, 2, 3], skip=5)
  with pytest.raises(ValueError, match=r'stimulus_K has shape \(2,\)'):
    metrics.noise_ceiling(resp, [1, 1], skip=5)


# ----------------------------------------------------------------------------------- CC_norm

def schoppe(y_RxT, pred_T):
  """Schoppe et al. 2016 for one stimulus, as printed: SP, CC_max and CC_norm."""
  r = len(y_RxT)
  sp = (np.var(y_RxT.sum(0)) - sum(np.var(y) for y in y_RxT)) / (r * (r - 1))
  ybar = y_RxT.mean(0)
  cc_max = np.sqrt(sp / np.var(ybar))
  return sp, cc_max, np.corrcoef(pred_T, ybar)[0, 1] / cc_max


def test_cc_norm_of_one_stimulus_is_schoppes_formula(rng):
  r, t, n, skip = 5, 80, 4, 10
  mu_TxN = 3 * rng.standard_normal((t, n))
  y_RxTxN = mu_TxN + rng.standard_normal((r, t, n)) * rng.uniform(0.5, 3, n)
  pred_TxN = mu_TxN + rng.standard_normal((t, n))
  pred_RxTxN = np.broadcast_to(pred_TxN, y_RxTxN.shape)
  want = np.array([schoppe(y_RxTxN[:, skip:, j], pred_TxN[skip:, j]) for j in range(n)]).T
  stimulus_K = [4] * r
  np.testing.assert_allclose(metrics.signal_power(y_RxTxN, stimulus_K, skip), want[0], **CLOSE)
  np.testing.assert_allclose(metrics.noise_ceiling(y_RxTxN, stimulus_K, skip), want[1], **CLOSE)
  np.testing.assert_allclose(metrics.cc_norm(pred_RxTxN, y_RxTxN, stimulus_K, skip), want[2],
                             **CLOSE)


def cc_norm_loop(pred, resp, stimulus_K, skip):
  """The documented estimators, frame by frame: SP = Var(ybar) - mean noise variance of ybar +
  noise variance of its grand mean; CC_max; CC_norm. Returns the three, per neuron."""
  n = resp[0].shape[1]
  out = []
  for j in range(n):
    ybars, pbars, noises, grand = [], [], [], 0.0
    for s in sorted(set(stimulus_K)):
      ks = [k for k, sk in enumerate(stimulus_K) if sk == s]
      if len(ks) < 2:
        continue
      dev_sum = np.zeros(len(ks))
      for t in range(skip, len(resp[ks[0]])):
        seen = [(i, resp[k][t, j]) for i, k in enumerate(ks) if not np.isnan(resp[k][t, j])]
        if len(seen) < 2:
          continue
        values = np.array([v for _, v in seen])
        ybars.append(values.mean())
        pbars.append(np.mean([pred[k][t, j] for k in ks]))
        noises.append(values.var(ddof=1) / len(values))
        for i, v in seen:
          dev_sum[i] += (v - values.mean()) / len(values)
      grand += len(ks) / (len(ks) - 1) * np.sum(dev_sum**2)
    sp = np.var(ybars) - np.mean(noises) + grand / len(ybars)**2
    cc_max = np.sqrt(sp / np.var(ybars)) if sp > 0 else np.nan
    out.append((sp, cc_max, corr_loop(pbars, ybars) / cc_max))
  return np.array(out).T


def test_signal_power_and_cc_norm_match_loop(rng):
  pred, resp, stimulus_K = repeated_session(rng, 4, nan=0.15)
  skip = int(rng.integers(0, 15))
  sp, cc_max, cc = cc_norm_loop(pred, resp, stimulus_K, skip)
  np.testing.assert_allclose(metrics.signal_power(resp, stimulus_K, skip), sp, **CLOSE)
  np.testing.assert_allclose(metrics.noise_ceiling(resp, stimulus_K, skip), cc_max, **CLOSE)
  np.testing.assert_allclose(metrics.cc_norm(pred, resp, stimulus_K, skip), cc, **CLOSE)


def test_signal_power_is_unbiased_across_stimuli_with_different_repeats(rng):
  """Every column is a replica: the same true means, fresh noise with a per-trial offset (noise
  correlated in time, which the grand-mean term has to account for)."""
  n, skip = 4000, 5
  repeats, lengths = (2, 3, 6), (25, 15, 30)
  mus = [2 * rng.standard_normal((t, 1)) for t in lengths]
  resp, stimulus_K = [], []
  for s, (r, mu) in enumerate(zip(repeats, mus)):
    for _ in range(r):
      resp.append(mu + rng.standard_normal((1, n)) + rng.standard_normal((len(mu), n)))
      stimulus_K.append(s)
  truth = np.var(np.concatenate([mu[skip:] for mu in mus]))
  sp_N = metrics.signal_power(resp, stimulus_K, skip)
  assert abs(sp_N.mean() - truth) < 4 * sp_N.std() / np.sqrt(n)


def poisson_repeats(rng, n, stimuli=6, repeats=10, frames=150):
  """Poisson counts of low rates (a noise ceiling near 0.8), each stimulus shown `repeats` times."""
  rates = [0.2 * np.logaddexp(0, 2 * rng.standard_normal((frames, n)) - 1) for _ in range(stimuli)]
  stimulus_K = np.repeat(np.arange(stimuli), repeats)
  rate_K = [rates[s] for s in stimulus_K]
  return rate_K, [rng.poisson(r).astype(float) for r in rate_K], stimulus_K


def test_cc_norm_of_the_true_rate_is_near_one_and_of_noise_near_zero(rng):
  rate_K, resp_K, stimulus_K = poisson_repeats(rng, 32)
  noise_K = [rng.standard_normal(r.shape) for r in rate_K]
  true_N = metrics.cc_norm(rate_K, resp_K, stimulus_K)
  assert 0.95 < metrics.mean_finite(true_N) < 1.05
  assert abs(metrics.mean_finite(metrics.cc_norm(noise_K, resp_K, stimulus_K))) < 0.05
  # Unnormalised, the truth scores only the noise ceiling: lower on averages, far lower per trial.
  raw = metrics.mean_finite(metrics.repeat_average_corr(rate_K, resp_K, stimulus_K))
  assert raw < 0.9
  np.testing.assert_allclose(raw, metrics.mean_finite(metrics.noise_ceiling(resp_K, stimulus_K)),
                             atol=0.03)
  assert metrics.mean_finite(metrics.single_trial_corr(rate_K, resp_K)) < 0.6


def test_noise_ceiling_of_noiseless_repeats_is_one(rng):
  rate_K, _, stimulus_K = poisson_repeats(rng, 8, stimuli=3, repeats=4, frames=80)
  np.testing.assert_allclose(metrics.noise_ceiling(rate_K, stimulus_K), 1, **CLOSE)
  np.testing.assert_allclose(metrics.cc_norm(rate_K, rate_K, stimulus_K), 1, **CLOSE)


def test_cc_norm_is_nan_exactly_where_there_is_no_signal(rng):
  resp = [rng.poisson(2.0, (90, 50)).astype(float) for _ in range(6)]   # constant rate
  stimulus_K = [0, 1, 0, 1, 0, 1]
  sp_N = metrics.signal_power(resp, stimulus_K)
  cc_N = metrics.cc_norm([rng.standard_normal(r.shape) for r in resp], resp, stimulus_K)
  assert (sp_N <= 0).any() and (sp_N > 0).any()
  np.testing.assert_array_equal(np.isnan(cc_N), sp_N <= 0)
  np.testing.assert_array_equal(np.isnan(metrics.noise_ceiling(resp, stimulus_K)), sp_N <= 0)


def test_mean_finite(rng):
  x = rng.standard_normal(20)
  x[[2, 5]], x[7] = np.nan, np.inf
  np.testing.assert_allclose(metrics.mean_finite(x), np.delete(x, [2, 5, 7]).mean(), **CLOSE)
  assert np.isnan(metrics.mean_finite([np.nan, np.nan]))


# ---------------------------------------------------------------------------------------- r2

def test_r2_matches_loop_and_its_fixed_points(rng):
  t, c = 50, 4
  target = rng.standard_normal((t, c))
  target[rng.random((t, c)) < 0.1] = np.nan
  pred = np.nan_to_num(target) + 0.5 * rng.standard_normal((t, c))
  mask = rng.random((t, c)) < 0.8
  want = []
  for j in range(c):
    keep = [i for i in range(t) if mask[i, j] and not np.isnan(target[i, j])]
    y, p = target[keep, j], pred[keep, j]
    want.append(1 - np.sum((p - y)**2) / np.sum((y - y.mean())**2))
  np.testing.assert_allclose(metrics.r2(pred, target, mask), want, **CLOSE)
  np.testing.assert_allclose(metrics.r2(target, target), 1, **CLOSE)
  mean_pred = np.broadcast_to(np.nanmean(target, 0), target.shape)
  np.testing.assert_allclose(metrics.r2(mean_pred, target), 0, atol=1e-12)
  flat = np.where(np.isnan(target), np.nan, 3.0)
  assert np.all(np.isnan(metrics.r2(pred, flat)))
  trials = [target[:20], target[20:]]
  np.testing.assert_allclose(metrics.r2([pred[:20], pred[20:]], trials), metrics.r2(pred, target),
                             **CLOSE)


# ---------------------------------------------------------------------------------- baseline

def test_design_matches_loop_and_lags_stay_in_their_trial(rng):
  t, h, w, pool, lags = 5, 8, 12, 4, 7
  frames = rng.integers(0, 256, (t, h, w), dtype=np.uint8)
  p = (h // pool) * (w // pool)
  want = np.zeros((t, lags * p + 1))
  for i in range(t):
    for lag in range(lags):
      if i - lag < 0:
        continue
      for by in range(h // pool):
        for bx in range(w // pool):
          block = frames[i - lag, by * pool:(by + 1) * pool, bx * pool:(bx + 1) * pool]
          want[i, lag * p + by * (w // pool) + bx] = block.mean() / 127.5 - 1
  want[:, -1] = 1
  np.testing.assert_allclose(baselines.design(frames, lags=lags, pool=pool), want, atol=1e-6)
  with pytest.raises(ValueError, match='multiples of pool=5'):
    baselines.design(frames, lags=lags, pool=5)


def test_ridge_ignores_missing_responses(rng):
  """With one penalty, the linear weights of fit_ln are the ridge solution over the observed
  frames only (here by the normal equations), whatever NaN hides; frames where every response is
  missing do not count, not even towards the penalty's unit."""
  stimuli = [rng.integers(0, 256, (60, 8, 16), dtype=np.uint8) for _ in range(10)]
  responses = [rng.poisson(2.0, (60, 3)).astype(float) for _ in range(10)]
  responses[2][:, 0] = np.nan
  responses[5][rng.random(60) < 0.3, 1] = np.nan
  responses[7][10:25] = np.nan
  ln = baselines.fit_ln(stimuli, responses, lags=3, ridge=(2.0,))
  d_TxE = np.concatenate([baselines.design(s, lags=3, pool=4) for s in stimuli]).astype(float)
  y_TxN = np.concatenate(responses)
  d_TxE, y_TxN = d_TxE[~np.isnan(y_TxN).all(1)], y_TxN[~np.isnan(y_TxN).all(1)]
  x_TxF = d_TxE[:, :-1] - d_TxE[:, :-1].mean(0)
  penalty = 2.0 * np.mean(np.sum(x_TxF**2, 0))     # in units of the mean feature energy
  for j in range(3):
    seen = ~np.isnan(y_TxN[:, j])
    a = d_TxE[seen].T @ d_TxE[seen] + penalty * np.diag([1.0] * x_TxF.shape[1] + [0.0])
    want = np.linalg.solve(a, d_TxE[seen].T @ y_TxN[seen, j])
    np.testing.assert_allclose(ln.w_ExN[:, j], want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_fit_ln_rejects_mismatched_trials(rng):
  stimuli = [rng.integers(0, 256, (30, 8, 16), dtype=np.uint8) for _ in range(3)]
  responses = [rng.poisson(1.0, (30, 2)).astype(float) for _ in range(3)]
  with pytest.raises(ValueError, match=r'trial 1: stimulus \(30, 8, 16\), responses \(29, 2\)'):
    baselines.fit_ln(stimuli, [responses[0], responses[1][:29], responses[2]])
  with pytest.raises(ValueError, match='ridge values > 0'):
    baselines.fit_ln(stimuli, responses, ridge=(0.0, 1.0))


def moving_stimuli(rng, trials, frames, h=36, w=64, pool=4):
  """Block noise at the pooled resolution (temporally smoothed) plus pixel noise, as uint8."""
  out = []
  for _ in range(trials):
    coarse = rng.standard_normal((frames, h // pool, w // pool))
    for t in range(1, frames):
      coarse[t] = 0.6 * coarse[t - 1] + 0.8 * coarse[t]
    fine = np.kron(coarse, np.ones((1, pool, pool))) + 0.3 * rng.standard_normal((frames, h, w))
    out.append(np.clip(127.5 + 50 * fine, 0, 255).astype(np.uint8))
  return out


def quadrature_rfs(rng, n, lags=8, h=9, w=16):
  """Pairs of Gabor receptive fields [n, lags * h * w] in quadrature, on the lagged pooled grid."""
  yy, xx = np.mgrid[:h, :w]
  cy, cx = rng.uniform(2, h - 2, (n, 1, 1)), rng.uniform(3, w - 3, (n, 1, 1))
  angle, width = rng.uniform(0, np.pi, (n, 1, 1)), rng.uniform(1.2, 2.0, (n, 1, 1))
  envelope = np.exp(-((yy - cy)**2 + (xx - cx)**2) / (2 * width**2))
  phase = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / 5
  temporal = np.exp(-np.arange(lags) / 2) * np.sin(np.pi * (np.arange(lags) + 1) / 6)
  rf = [temporal[:, None, None] * (envelope * f(phase))[:, None] for f in (np.cos, np.sin)]
  return [r.reshape(n, -1) for r in rf]


def test_ln_recovers_an_ln_neuron_and_fails_on_an_energy_neuron(rng):
  """Half the neurons are LN (Gabor RF + softplus + Poisson), half energy-model complex cells
  ((even^2 + odd^2) -> softplus -> Poisson). On this sign-symmetric stimulus an energy neuron has
  no linear component, so the LN fit predicts it barely better than chance: the gap the baseline
  leaves for a better model."""
  n, fit_trials = 12, 32
  stimuli = moving_stimuli(rng, fit_trials + 8, 200)
  even, odd = quadrature_rfs(rng, n)

  def rates(frames):
    x_TxF = baselines.design(frames, lags=8, pool=4)[:, :-1].astype(float)
    lin, quad = x_TxF @ even.T, x_TxF @ odd.T
    energy = lin**2 + quad**2
    simple = lin / lin.std(0)
    complex_ = (energy - energy.mean(0)) / energy.std(0)
    return 2 * np.logaddexp(0, 1.5 * np.concatenate([simple[:, :n // 2], complex_[:, n // 2:]], 1)
                            - 0.5)

  rate_K = [rates(s) for s in stimuli]
  responses = [rng.poisson(r).astype(float) for r in rate_K]
  ln = baselines.fit_ln(stimuli[:fit_trials], responses[:fit_trials])
  pred_K = ln.predict(stimuli[fit_trials:])
  corr_N = metrics.pearson(np.concatenate(pred_K), np.concatenate(rate_K[fit_trials:]))
  simple_N, complex_N = corr_N[:n // 2], corr_N[n // 2:]
  assert simple_N.mean() > 0.8 and simple_N.min() > 0.7, simple_N
  assert complex_N.max() < 0.3 and simple_N.mean() - complex_N.mean() > 0.6, complex_N
  assert all(p.shape == (200, n) and np.all(p >= 0) for p in pred_K)
