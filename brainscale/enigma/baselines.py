"""The LN (linear-nonlinear) encoding model: the baseline Enigma has to beat.

Average-pooled frames at `lags` past time steps -> a ridge-regressed linear receptive field per
neuron -> an output nonlinearity a * softplus(b z + c) fitted by Poisson likelihood. NumPy, CPU.
"""

import dataclasses

import numpy as np
import scipy.linalg

from brainscale.enigma import metrics


def pooled_frames(frames_TxHxW, pool: int) -> np.ndarray:
  """[T, h * w]: frames average-pooled over pool x pool blocks, gray levels 0..255 -> [-1, 1]."""
  x = np.asarray(frames_TxHxW)
  if x.ndim != 3 or x.shape[1] % pool or x.shape[2] % pool:
    raise ValueError(f'frames of shape {x.shape}; expected [T, H, W] with H and W multiples of '
                     f'pool={pool}')
  t, h, w = x.shape[0], x.shape[1] // pool, x.shape[2] // pool
  blocks = x.reshape(t, h, pool, w, pool).astype(np.float64).mean((2, 4))
  return blocks.reshape(t, h * w) / 127.5 - 1


def design(frames_TxHxW, *, lags: int, pool: int) -> np.ndarray:
  """[T, lags * h * w + 1] float32: pooled frames at lags 0..lags-1 (zero before the trial start,
  so lags never cross trials), then a constant 1."""
  x_TxP = pooled_frames(frames_TxHxW, pool)
  t, p = x_TxP.shape
  d_TxE = np.zeros((t, lags * p + 1), np.float32)
  for lag in range(min(lags, t)):
    d_TxE[lag:, lag * p:(lag + 1) * p] = x_TxP[:t - lag]
  d_TxE[:, -1] = 1
  return d_TxE


def drive(d_TxE, w_ExN) -> np.ndarray:
  """The linear drive z [T, N] = d w (float32 product, float64 result)."""
  return (d_TxE @ np.asarray(w_ExN, d_TxE.dtype)).astype(np.float64)


def softplus(u):
  return np.logaddexp(0, u)


@dataclasses.dataclass(frozen=True)
class LN:
  """Rates = a * softplus(b * (design @ w) + c), per neuron."""
  lags: int
  pool: int
  w_ExN: np.ndarray      # E = lags * h * w + 1; the last row is the intercept
  a_N: np.ndarray
  b_N: np.ndarray
  c_N: np.ndarray
  ridge_N: np.ndarray    # the chosen penalty, in units of the mean feature energy (see fit_ln)

  def linear(self, stimuli) -> list[np.ndarray]:
    """The linear drive z [T, N] of each trial."""
    return [drive(design(s, lags=self.lags, pool=self.pool), self.w_ExN) for s in stimuli]

  def predict(self, stimuli) -> list[np.ndarray]:
    """Predicted rates [T, N] of each trial of uint8 frames [T, H, W]."""
    return [self.a_N * softplus(self.b_N * z + self.c_N) for z in self.linear(stimuli)]


@dataclasses.dataclass(frozen=True)
class _Sums:
  """Sums over design rows (features x, without the constant): n, x, x'x; the normal equations'
  left side, shared by every neuron and penalty. Sums of two row sets add."""
  n: int
  x_F: np.ndarray
  xx_FxF: np.ndarray

  def __add__(self, other):
    return _Sums(self.n + other.n, self.x_F + other.x_F, self.xx_FxF + other.xx_FxF)


def _sums(d_TxE) -> _Sums:
  x_TxF = d_TxE[:, :-1]
  return _Sums(len(x_TxF), x_TxF.sum(0, np.float64), (x_TxF.T @ x_TxF).astype(np.float64))


def _cross(d_TxE, y_TxN) -> np.ndarray:
  """[E, N] = d'y over the observed responses (NaN counts as 0): x'y, then the sum of y."""
  y = np.nan_to_num(np.asarray(y_TxN, np.float64), nan=0.0)
  return (d_TxE.T @ y.astype(d_TxE.dtype)).astype(np.float64)


class _Ridge:
  """Ridge weights w [E, N] minimising |y - d w|^2 + ridge * unit * |w_features|^2 for any y, the
  intercept unpenalised (features centred); `unit` is the mean feature energy, the mean diagonal
  of the centred x'x. One Cholesky factorisation per distinct penalty, shared by its neurons."""

  def __init__(self, sums: _Sums, ridge_N):
    self.n, self.mean_F, self.ridge_N = sums.n, sums.x_F / sums.n, ridge_N
    g_FxF = sums.xx_FxF - sums.n * np.outer(self.mean_F, self.mean_F)
    unit = np.mean(np.diag(g_FxF))
    self.factors = {r: scipy.linalg.cho_factor(g_FxF + r * unit * np.eye(len(g_FxF)))
                    for r in np.unique(ridge_N)}

  def __call__(self, cross_ExC, cols_N=slice(None)) -> np.ndarray:
    """The weights of neurons `cols_N` from their d'y."""
    xy_FxC = cross_ExC[:-1] - np.outer(self.mean_F, cross_ExC[-1])
    w_FxC = np.empty_like(xy_FxC)
    for r, factor in self.factors.items():
      mine = self.ridge_N[cols_N] == r
      w_FxC[:, mine] = scipy.linalg.cho_solve(factor, xy_FxC[:, mine])
    return np.concatenate([w_FxC, (cross_ExC[-1] / self.n - self.mean_F @ w_FxC)[None]])


def _ridge_missing(d_TxE, y_TxN, ridge: _Ridge, cross_ExN, sweeps: int = 10) -> np.ndarray:
  """Ridge weights over the observed (non-NaN) responses; `cross_ExN` is their d'y. Missing ones,
  first their neuron's mean, are refilled with the fit's own prediction until the weights settle
  (EM for least squares, at most `sweeps`), touching only the rows and neurons that have any."""
  w_ExN = ridge(cross_ExN)
  missing_TxN = np.isnan(y_TxN)
  cols = missing_TxN.any(0)
  if not cols.any():
    return w_ExN
  rows = missing_TxN[:, cols].any(1)
  d_MxE, missing_MxC = d_TxE[rows], missing_TxN[rows][:, cols]
  seen_C = np.maximum((~missing_TxN[:, cols]).sum(0), 1)
  fill_MxC = np.broadcast_to(np.nansum(y_TxN[:, cols], 0) / seen_C, missing_MxC.shape)
  w_ExC = w_ExN[:, cols]
  for _ in range(sweeps):
    filled_MxC = np.where(missing_MxC, fill_MxC, 0)
    previous, w_ExC = w_ExC, ridge(cross_ExN[:, cols] + _cross(d_MxE, filled_MxC), cols)
    if np.abs(w_ExC - previous).max() <= 1e-5 * np.abs(w_ExC).max():
      break
    fill_MxC = drive(d_MxE, w_ExC)
  w_ExN[:, cols] = w_ExC
  return w_ExN


def _objective(theta_3xN, zs_TxN, y_TxN, ok_TxN, prior_N) -> np.ndarray:
  """Poisson NLL [N] of f = exp(theta0) softplus(theta1 z + theta2), plus prior (b^2 + c^2) / 2."""
  f = np.maximum(np.exp(theta_3xN[0]) * softplus(theta_3xN[1] * zs_TxN + theta_3xN[2]), 1e-12)
  nll_N = np.where(ok_TxN, f - y_TxN * np.log(f), 0).sum(0)
  return nll_N + 0.5 * prior_N * (theta_3xN[1]**2 + theta_3xN[2]**2)


def _fit_softplus(z_TxN, y_TxN, iters: int = 30, prior: float = 1e-3):
  """(a, b, c) [N] of f = a softplus(b z + c) maximising the Poisson likelihood of y given z.

  Fisher scoring on (log a, b, c) of standardised z, with per-neuron step halving. A weak Gaussian
  prior on (b, c) (`prior` x frames) keeps the exponential limit (c -> -inf, a -> inf) from
  drifting. NaN responses are left out, negative ones count as 0.
  """
  ok = ~np.isnan(y_TxN)
  y = np.where(ok, np.maximum(y_TxN, 0), 0)
  n_N = np.maximum(ok.sum(0), 1)
  loc_N = np.where(ok, z_TxN, 0).sum(0) / n_N
  scale_N = np.sqrt(np.where(ok, (z_TxN - loc_N)**2, 0).sum(0) / n_N)
  scale_N = np.where(scale_N > 0, scale_N, 1)
  zs = (z_TxN - loc_N) / scale_N
  theta_3xN = np.stack([np.log(np.maximum(y.sum(0) / n_N, 1e-6) / np.log(2)),
                        np.ones_like(loc_N), np.zeros_like(loc_N)])
  prior_N = prior * n_N
  loss_N = _objective(theta_3xN, zs, y, ok, prior_N)
  for _ in range(iters):
    u = theta_3xN[1] * zs + theta_3xN[2]
    f = np.maximum(np.exp(theta_3xN[0]) * softplus(u), 1e-12)
    slope = np.exp(theta_3xN[0] - softplus(-u))   # a * sigmoid(u)
    j_3xTxN = np.stack([f, slope * zs, slope])
    grad_Nx3 = np.einsum('itn,tn->ni', j_3xTxN, np.where(ok, 1 - y / f, 0))
    fisher_Nx3x3 = np.einsum('itn,jtn,tn->nij', j_3xTxN, j_3xTxN, np.where(ok, 1 / f, 0))
    grad_Nx3[:, 1:] += prior_N[:, None] * theta_3xN[1:].T
    fisher_Nx3x3 += prior_N[:, None, None] * np.diag([1e-6, 1, 1])
    step_3xN = np.linalg.solve(fisher_Nx3x3, grad_Nx3[..., None])[..., 0].T
    before_N, todo_N = loss_N, np.ones_like(loss_N, bool)
    for size in 0.5**np.arange(10):
      trial_3xN = theta_3xN - size * step_3xN
      trial_N = _objective(trial_3xN, zs, y, ok, prior_N)
      better = todo_N & (trial_N < loss_N)
      theta_3xN = np.where(better, trial_3xN, theta_3xN)
      loss_N = np.where(better, trial_N, loss_N)
      todo_N &= ~better
      if not todo_N.any():
        break
    if np.all(before_N - loss_N <= 1e-9 * np.abs(before_N)):
      break
  log_a, b, c = theta_3xN
  return np.exp(log_a), b / scale_N, c - b * loc_N / scale_N


def _checked(stimuli, responses) -> tuple[list, list[np.ndarray]]:
  if len(stimuli) != len(responses) or len(stimuli) < 2:
    raise ValueError(f'{len(stimuli)} stimulus trials and {len(responses)} response trials; '
                     'expected as many of each, at least 2')
  responses = [np.asarray(r, np.float64) for r in responses]
  for k, (s, r) in enumerate(zip(stimuli, responses)):
    if r.ndim != 2 or np.shape(s)[0] != r.shape[0] or r.shape[1] != responses[0].shape[1]:
      raise ValueError(f'trial {k}: stimulus {np.shape(s)}, responses {r.shape}; expected '
                       f'[T, H, W] and [T, {responses[0].shape[1]}] with the same T')
  return stimuli, responses


def _split(d_K, responses_K, validation: float, seed: int):
  """[(design, responses) of the fitting trials, the same of a random `validation` fraction]."""
  k = len(d_K)
  held = min(max(1, round(validation * k)), k - 1)
  order = np.random.default_rng(seed).permutation(k)
  return [(np.concatenate([d_K[i] for i in ks]), np.concatenate([responses_K[i] for i in ks]))
          for ks in (sorted(order[held:]), sorted(order[:held]))]


def fit_ln(stimuli, responses, *, lags: int = 8, pool: int = 4,
           ridge=(1e-1, 1, 10, 100, 1e3), validation: float = 0.2, seed: int = 0) -> LN:
  """Fits an LN model to trials of uint8 frames [T, H, W] and responses [T, N] (NaN = missing).

  Ridge penalties are in units of the mean feature energy (the mean diagonal of the centred
  features' Gram matrix), so the grid does not depend on how many frames there are. Each neuron
  takes the penalty whose linear prediction correlates best with the responses of a held-out
  `validation` fraction of the trials (the strongest among ties); the output nonlinearity is fitted
  to those held-out predictions (not to overfitted in-sample ones); the linear stage is then
  refitted on all trials. Frames where every response is missing are dropped first; other missing
  responses drop out of every stage (see _ridge_missing).
  """
  stimuli, responses = _checked(stimuli, responses)
  ridge = sorted(ridge)
  if lags < 1 or not 0 < validation < 1 or min(ridge) <= 0:
    raise ValueError(f'lags={lags}, validation={validation}, ridge={ridge}; expected lags >= 1, '
                     'validation in (0, 1) and ridge values > 0')
  d_K = [design(s, lags=lags, pool=pool) for s in stimuli]
  seen_K = [~np.isnan(r).all(1) for r in responses]       # frames with any response
  d_K, responses = [d[s] for d, s in zip(d_K, seen_K)], [r[s] for r, s in zip(responses, seen_K)]
  (fit_TxE, fit_TxN), (val_TxE, val_TxN) = _split(d_K, responses, validation, seed)
  del d_K
  sums, cross_ExN = _sums(fit_TxE), _cross(fit_TxE, fit_TxN)
  n = fit_TxN.shape[1]
  z_RxTxN = np.stack([drive(val_TxE, _ridge_missing(fit_TxE, fit_TxN, _Ridge(sums, np.full(n, r)),
                                                   cross_ExN)) for r in ridge])
  score_RxN = np.stack([metrics.pearson(z, val_TxN) for z in z_RxTxN])
  best_N = len(ridge) - 1 - np.argmax(score_RxN[::-1], 0)       # ties: the strongest penalty
  a_N, b_N, c_N = _fit_softplus(np.take_along_axis(z_RxTxN, best_N[None, None], 0)[0], val_TxN)

  ridge_N = np.asarray(ridge, np.float64)[best_N]
  sums, cross_ExN = sums + _sums(val_TxE), cross_ExN + _cross(val_TxE, val_TxN)
  if np.isnan(val_TxN).any():        # _ridge_missing needs every row with a missing response
    fit_TxE, fit_TxN = np.concatenate([fit_TxE, val_TxE]), np.concatenate([fit_TxN, val_TxN])
  w_ExN = _ridge_missing(fit_TxE, fit_TxN, _Ridge(sums, ridge_N), cross_ExN)
  return LN(lags, pool, w_ExN, a_N, b_N, c_N, ridge_N)
