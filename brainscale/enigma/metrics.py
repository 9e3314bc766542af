"""Sensorium 2023 metrics of neural prediction, and CC_norm (Schoppe et al. 2016).

NumPy, float64. Trials come as an array [K, T, N] or a list of [T_k, N] arrays
(lengths may differ); NaN in a response marks a missing sample and drops that
(frame, neuron) pair. Every function returns one value per neuron (or channel).
"""

import numpy as np


def _trials(x_KxTxN, name: str) -> list[np.ndarray]:
  if isinstance(x_KxTxN, (list, tuple)):
    trials = [np.asarray(t, np.float64) for t in x_KxTxN]
  else:
    x = np.asarray(x_KxTxN, np.float64)
    if x.ndim != 3:
      raise ValueError(f'{name} has shape {x.shape}; expected trials [K, T, N] or a list of [T, N]')
    trials = list(x)
  if not trials:
    raise ValueError(f'{name} has no trials; expected at least one')
  for k, t in enumerate(trials):
    if t.ndim != 2:
      raise ValueError(f'{name}[{k}] has shape {t.shape}; expected [T, N]')
  return trials


def _skippable(trials_K: list[np.ndarray], skip: int) -> list[np.ndarray]:
  if skip < 0:
    raise ValueError(f'skip={skip}; expected a number of frames >= 0')
  for k, t in enumerate(trials_K):
    if t.shape[0] <= skip:
      raise ValueError(f'trial {k} has {t.shape[0]} frames, skip={skip}; expected more frames '
                       'than skip')
  return trials_K


def _paired(pred, resp, skip: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Both sets of trials as float64 lists, checked against each other and against `skip`."""
  pred_K, resp_K = _trials(pred, 'pred'), _skippable(_trials(resp, 'resp'), skip)
  if len(pred_K) != len(resp_K):
    raise ValueError(f'pred has {len(pred_K)} trials, resp has {len(resp_K)}; expected the same')
  for k, (p, r) in enumerate(zip(pred_K, resp_K)):
    if p.shape != r.shape:
      raise ValueError(f'pred[{k}] has shape {p.shape}, resp[{k}] has {r.shape}; expected equal')
  return pred_K, resp_K


def pearson(x_TxN, y_TxN) -> np.ndarray:
  """Per-column Pearson correlation [N] over the rows where both are not NaN.

  A column with fewer than two such rows, or constant in x or y over them, gets 0.
  """
  x, y = np.asarray(x_TxN, np.float64), np.asarray(y_TxN, np.float64)
  if x.shape != y.shape or x.ndim not in (1, 2):
    raise ValueError(f'pearson of shapes {x.shape} and {y.shape}; expected equal [T, N]')
  x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
  ok = ~(np.isnan(x) | np.isnan(y))
  n_N = ok.sum(0)
  safe_n = np.maximum(n_N, 1)
  dx = np.where(ok, x - np.where(ok, x, 0).sum(0) / safe_n, 0)
  dy = np.where(ok, y - np.where(ok, y, 0).sum(0) / safe_n, 0)
  varying = _varies(x, ok) & _varies(y, ok) & (n_N >= 2)
  denom = np.sqrt((dx * dx).sum(0) * (dy * dy).sum(0))
  return np.where(varying, (dx * dy).sum(0) / np.where(varying, denom, 1), 0.0)


def _varies(x_TxN, ok_TxN) -> np.ndarray:
  """Whether each column takes more than one value over its ok rows (exact, no tolerance)."""
  return np.where(ok_TxN, x_TxN, np.inf).min(0) < np.where(ok_TxN, x_TxN, -np.inf).max(0)


def single_trial_corr(pred_KxTxN, resp_KxTxN, skip: int = 50) -> np.ndarray:
  """Sensorium single-trial correlation [N]: each trial's first `skip` frames dropped, the rest
  concatenated over trials, Pearson per neuron (NaN responses excluded pairwise)."""
  pred_K, resp_K = _paired(pred_KxTxN, resp_KxTxN, skip)
  return pearson(np.concatenate([p[skip:] for p in pred_K]),
                 np.concatenate([r[skip:] for r in resp_K]))


def _repeats(trials_K: list[np.ndarray], stimulus_K, skip: int) -> list[np.ndarray]:
  """[R, T - skip, N] per stimulus shown at least twice, in order of stimulus id."""
  ids_K = np.asarray(stimulus_K)
  if ids_K.shape != (len(trials_K),):
    raise ValueError(f'stimulus_K has shape {ids_K.shape}; expected one id per trial '
                     f'({len(trials_K)},)')
  groups = []
  for s in np.unique(ids_K):
    members = [trials_K[k] for k in np.flatnonzero(ids_K == s)]
    if len(members) < 2:
      continue
    if len({t.shape for t in members}) > 1:
      raise ValueError(f'stimulus {s} has repeats of shapes {sorted({t.shape for t in members})}; '
                       'expected repeats of one stimulus to have equal shapes')
    groups.append(np.stack([t[skip:] for t in members]))
  if not groups:
    raise ValueError('no stimulus in stimulus_K is shown twice; expected repeats')
  return groups


def _repeat_mean(y_RxTxN) -> tuple[np.ndarray, np.ndarray]:
  """(mean over the non-NaN repeats [T, N], NaN where none; their count [T, N])."""
  ok = ~np.isnan(y_RxTxN)
  count_TxN = ok.sum(0)
  total = np.where(ok, y_RxTxN, 0).sum(0)
  return np.where(count_TxN > 0, total / np.maximum(count_TxN, 1), np.nan), count_TxN


def repeat_average_corr(pred_KxTxN, resp_KxTxN, stimulus_K, skip: int = 50) -> np.ndarray:
  """Sensorium correlation to average [N]: responses and predictions averaged over each repeated
  stimulus's repeats, first `skip` frames dropped, concatenated over stimuli, Pearson per neuron.

  Stimuli shown once are ignored; NaN responses are left out of the averages.
  """
  pred_K, resp_K = _paired(pred_KxTxN, resp_KxTxN, skip)
  pbar = [_repeat_mean(p)[0] for p in _repeats(pred_K, stimulus_K, skip)]
  ybar = [_repeat_mean(y)[0] for y in _repeats(resp_K, stimulus_K, skip)]
  return pearson(np.concatenate(pbar), np.concatenate(ybar))


def _repeat_stats(resp_KxTxN, stimulus_K, skip: int):
  """Over frames with >= 2 non-NaN repeats: (mean response [T, N], NaN on other frames; signal
  power [N])."""
  resp_K = _skippable(_trials(resp_KxTxN, 'resp'), skip)
  ybars, noises, grand_noise = [], [], 0
  for y_RxTxN in _repeats(resp_K, stimulus_K, skip):
    ybar_TxN, count_TxN = _repeat_mean(y_RxTxN)
    ok = ~np.isnan(y_RxTxN) & (count_TxN >= 2)
    dev = np.where(ok, y_RxTxN - ybar_TxN, 0)
    # Variance of ybar_t from its repeats' scatter, and that of the grand mean of ybar
    # (from each repeat's frame-summed deviations: noise correlated in time counts fully).
    noises.append(np.where(count_TxN >= 2, (dev**2).sum(0) / np.maximum(count_TxN - 1, 1), 0) /
                  np.maximum(count_TxN, 1))
    r = len(y_RxTxN)
    grand_noise = grand_noise + r / (r - 1) * ((dev / np.maximum(count_TxN, 1)).sum(1)**2).sum(0)
    ybars.append(np.where(count_TxN >= 2, ybar_TxN, np.nan))
  ybar_TxN, noise_TxN = np.concatenate(ybars), np.concatenate(noises)
  n_N = np.maximum((~np.isnan(ybar_TxN)).sum(0), 1)
  return ybar_TxN, _variance(ybar_TxN) - noise_TxN.sum(0) / n_N + grand_noise / n_N**2


def _variance(x_TxN) -> np.ndarray:
  """Population variance (ddof 0) of each column over its non-NaN rows."""
  ok = ~np.isnan(x_TxN)
  n_N = np.maximum(ok.sum(0), 1)
  d = np.where(ok, x_TxN - np.where(ok, x_TxN, 0).sum(0) / n_N, 0)
  return (d * d).sum(0) / n_N


def signal_power(resp_KxTxN, stimulus_K, skip: int = 50) -> np.ndarray:
  """Signal power [N]: the variance over the concatenated skipped frames of the true mean response.

  Per stimulus with R repeats this is Schoppe's SP = (Var(sum_r y_r) - sum_r Var(y_r)) / (R (R-1))
  (variances over frames, ddof 0). Over several stimuli, each with its own R, it is the variance of
  the repeat-averaged response minus the noise variance of that average, estimated per frame from
  the repeats' scatter, plus the noise variance of its grand mean (estimated per stimulus from the
  repeats' frame-averaged deviations); for one stimulus the two agree exactly. Frames with fewer
  than two non-NaN repeats are left out (with NaN the last term is approximate).
  """
  return _repeat_stats(resp_KxTxN, stimulus_K, skip)[1]


def _ceiling(ybar_TxN, sp_N) -> np.ndarray:
  var_N = _variance(ybar_TxN)
  good = (sp_N > 0) & (var_N > 0)
  return np.where(good, np.sqrt(np.where(good, sp_N, 1) / np.where(good, var_N, 1)), np.nan)


def noise_ceiling(resp_KxTxN, stimulus_K, skip: int = 50) -> np.ndarray:
  """CC_max [N] = sqrt(SP / Var(mean response)); NaN where SP <= 0 (no measurable signal)."""
  return _ceiling(*_repeat_stats(resp_KxTxN, stimulus_K, skip))


def cc_norm(pred_KxTxN, resp_KxTxN, stimulus_K, skip: int = 50) -> np.ndarray:
  """CC_norm [N] = CC_abs / CC_max (Schoppe et al. 2016), NaN where SP <= 0.

  CC_abs is the Pearson correlation of the repeat-averaged prediction with the repeat-averaged
  response over the frames that enter CC_max (skipped, >= 2 non-NaN repeats). Not clipped to 1.
  """
  pred_K, resp_K = _paired(pred_KxTxN, resp_KxTxN, skip)
  ybar_TxN, sp_N = _repeat_stats(resp_K, stimulus_K, skip)
  pbar_TxN = np.concatenate([_repeat_mean(p)[0] for p in _repeats(pred_K, stimulus_K, skip)])
  return pearson(pbar_TxN, ybar_TxN) / _ceiling(ybar_TxN, sp_N)


def mean_finite(x) -> float:
  """Mean over the finite entries of x; NaN if there are none."""
  x = np.asarray(x, np.float64)
  finite = np.isfinite(x)
  return float(x[finite].mean()) if finite.any() else float('nan')


def _frames(x, name: str) -> np.ndarray:
  """[T, C] from [T, C], [K, T, C] or a list of [T_k, C]."""
  if isinstance(x, (list, tuple)):
    return np.concatenate(_trials(x, name))
  x = np.asarray(x, np.float64)
  if x.ndim == 3:
    return x.reshape(-1, x.shape[-1])
  if x.ndim != 2:
    raise ValueError(f'{name} has shape {x.shape}; expected [T, C], [K, T, C] or a list of [T, C]')
  return x


def r2(pred_TxC, target_TxC, mask_TxC=None) -> np.ndarray:
  """Coefficient of determination [C] = 1 - SSE / SST over masked, non-NaN-target samples.

  Takes [T, C], [K, T, C] or lists of trials. NaN for a channel whose target is constant there.
  """
  pred, target = _frames(pred_TxC, 'pred'), _frames(target_TxC, 'target')
  if pred.shape != target.shape:
    raise ValueError(f'pred has shape {pred.shape}, target {target.shape}; expected equal')
  ok = ~np.isnan(target)
  if mask_TxC is not None:
    mask = _frames(mask_TxC, 'mask') != 0
    if mask.shape != target.shape:
      raise ValueError(f'mask has shape {mask.shape}, target {target.shape}; expected equal')
    ok &= mask
  n_C = np.maximum(ok.sum(0), 1)
  mean_C = np.where(ok, target, 0).sum(0) / n_C
  sse = np.where(ok, (pred - target)**2, 0).sum(0)
  sst = np.where(ok, (target - mean_C)**2, 0).sum(0)
  varying = _varies(target, ok)
  return np.where(varying, 1 - sse / np.where(varying, sst, 1), np.nan)
