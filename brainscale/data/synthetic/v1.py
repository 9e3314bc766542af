"""A simulated mouse V1 population with known answers, Enigma's default neural data.

Simple cells (Gabor x biphasic temporal kernel) and complex cells (quadrature energy) see
drifting, jumping pink-noise videos; running and pupil modulate their gain; Poisson spikes
or calcium traces are drawn around the true rates. Everything is a pure function of Spec.
Written to disk (the neural store and its truth.json, the Sensorium layout): v1_files.py.
"""

import dataclasses
import functools
import math

import numpy as np
import scipy.fft
import scipy.signal

from brainscale.data.behavior import CHANNELS

F32 = np.float32
TRUTH_FILE = 'truth.json'   # each neuron's true RF, beside the store (v1_files.py)
# seed-stream tags: every draw comes from default_rng([spec.seed, TAG, ...])
_STIMULUS, _CALIBRATION, _NEURONS, _BEHAVIOR, _TRIALS, _NOISE, _MEMBERS = range(7)
CALIBRATION_STIMULI = 8       # videos on which each neuron's drive is normalised
DRIFT = 0.3                   # max image drift, pixels per frame
LUMINANCE_STD = 50.0          # grey levels at contrast 1
STRONG_DRIVE = 2.0            # drive (in stds) at which rate = gain * peak_rate
SLOPE = 2.0                   # softplus slope of the output nonlinearity
SATURATION = 1.0              # rates saturate at (1 + SATURATION) * peak_rate * gain
ADAPT_SECONDS = 1.0           # time constant of the slow adaptation
CORTEX_UM = 600.0             # imaged field of view (square), micrometres
# population constants that turn behaviour into z-scores for the gain model
RUNNING_MEAN, RUNNING_STD = 8.0, 9.0       # cm/s
PUPIL_MEAN, PUPIL_STD = 22.0, 3.5          # eye-camera pixels


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything that defines a simulated dataset; hashable, JSON via dataclasses.asdict."""
  animals: int = 3
  sessions_per_animal: int = 2
  neurons: int = 64                  # per session
  shared: float = 0.5                # fraction of a session's neurons in all its animal's sessions
  frame_shape: tuple[int, int] = (36, 64)
  rate: float = 30.0                 # neural and stimulus clock, Hz
  behavior_rate: float = 20.0        # behaviour clock, Hz (with a random phase offset)
  trial_seconds: float = 10.0
  train_trials: int = 128            # 10 s each: 21 min of training video per session
  validation_trials: int = 4
  repeat_stimuli: int = 4            # stimuli of tier 'repeats', shared by all sessions
  repeats: int = 5                   # showings of each repeat stimulus per session
  complex_fraction: float = 0.5
  noise: str = 'poisson'             # 'poisson' | 'calcium'
  peak_rate: float = 2.0             # expected spikes per sample at strong drive
  running_gain: float = 0.4          # std (and twice the mean) of per-neuron running log-gains
  pupil_gain: float = 0.3            # std of per-neuron pupil log-gains (mean 0)
  calcium_tau: float = 0.4           # seconds, decay of the calcium kernel
  calcium_noise: float = 0.3         # std of the additive gaussian noise of calcium traces
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, 'frame_shape', tuple(self.frame_shape))
    for problem in _problems(self):
      raise ValueError(f'Spec.{problem}')

  @property
  def trial_samples(self) -> int:
    return int(round(self.trial_seconds * self.rate))

  @property
  def trials(self) -> int:
    return self.train_trials + self.validation_trials + self.repeat_stimuli * self.repeats

  @property
  def shared_neurons(self) -> int:
    return int(round(self.shared * self.neurons))

  @property
  def pool(self) -> int:
    """Neurons per animal: the shared ones plus each session's own."""
    return self.shared_neurons + self.sessions_per_animal * (self.neurons - self.shared_neurons)


def _problems(s: Spec) -> list[str]:
  """What is wrong with a Spec, one line each."""
  checks = [
      (s.animals >= 1 and s.sessions_per_animal >= 1,
       f'animals={s.animals}, sessions_per_animal={s.sessions_per_animal}; need >= 1'),
      (s.neurons >= 1, f'neurons={s.neurons}; need >= 1'),
      (0 <= s.shared <= 1, f'shared={s.shared}; need 0 <= shared <= 1'),
      (len(s.frame_shape) == 2 and min(s.frame_shape) >= 8,
       f'frame_shape={s.frame_shape}; need (H, W) with H, W >= 8'),
      (s.rate > 0 and s.behavior_rate > 0,
       f'rate={s.rate}, behavior_rate={s.behavior_rate}; need > 0'),
      (s.trial_seconds * s.rate >= 8, f'trial_seconds={s.trial_seconds} at rate={s.rate} '
       f'gives {s.trial_seconds * s.rate:g} samples per trial; need >= 8'),
      (min(s.train_trials, s.validation_trials, s.repeat_stimuli, s.repeats) >= 0,
       f'train_trials={s.train_trials}, validation_trials={s.validation_trials}, '
       f'repeat_stimuli={s.repeat_stimuli}, repeats={s.repeats}; need >= 0'),
      (s.train_trials >= 1, f'train_trials={s.train_trials}; need >= 1'),
      (0 <= s.complex_fraction <= 1, f'complex_fraction={s.complex_fraction}; need in [0, 1]'),
      (s.noise in ('poisson', 'calcium'), f"noise={s.noise!r}; need 'poisson' or 'calcium'"),
      (s.peak_rate > 0, f'peak_rate={s.peak_rate}; need > 0'),
      (min(s.running_gain, s.pupil_gain, s.calcium_noise) >= 0 and s.calcium_tau > 0,
       f'running_gain={s.running_gain}, pupil_gain={s.pupil_gain}, calcium_tau='
       f'{s.calcium_tau}, calcium_noise={s.calcium_noise}; need >= 0 (tau > 0)'),
      (s.seed >= 0, f'seed={s.seed}; need >= 0'),
  ]
  return [message for ok, message in checks if not ok]


def _rng(spec: Spec, *key: int) -> np.random.Generator:
  return np.random.default_rng([spec.seed, *key])


# ----------------------------------------------------------------------------- stimulus

def _pink_spectrum(rng, height: int, width: int) -> np.ndarray:
  """rfft2 coefficients [height, width // 2 + 1] of a random 1/f image of unit std."""
  f_HxW = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
  amplitude_HxW = np.where((f_HxW > 0) & (f_HxW < 0.45), 1 / np.maximum(f_HxW, 1e-9), 0.0)
  noise_HxW = rng.normal(size=f_HxW.shape) + 1j * rng.normal(size=f_HxW.shape)
  spectrum_HxW = noise_HxW * amplitude_HxW
  return spectrum_HxW / np.fft.irfft2(spectrum_HxW, s=(height, width)).std()


def _segment(rng, spec: Spec, frames: int) -> np.ndarray:
  """float [frames, H, W] grey levels: one pink-noise image drifting at a constant velocity."""
  h, w = spec.frame_shape
  canvas_h, canvas_w = 2 * h, 2 * w   # periodic canvas; the view is one quarter of it
  spectrum_HxW = _pink_spectrum(rng, canvas_h, canvas_w)
  heading, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0, DRIFT)
  start_2 = rng.uniform(0, [canvas_w, canvas_h])
  shift_Tx2 = start_2 + speed * np.arange(frames)[:, None] * [np.cos(heading), np.sin(heading)]
  fy_H, fx_W = np.fft.fftfreq(canvas_h), np.fft.rfftfreq(canvas_w)
  phase_x_TxW = np.exp(-2j * np.pi * shift_Tx2[:, :1] * fx_W).astype(np.complex64)
  phase_y_TxH = np.exp(-2j * np.pi * shift_Tx2[:, 1:] * fy_H).astype(np.complex64)
  shifted_TxHxW = spectrum_HxW.astype(np.complex64) * phase_y_TxH[:, :, None] * phase_x_TxW[:, None]
  image_TxHxW = scipy.fft.irfft2(shifted_TxHxW, s=(canvas_h, canvas_w), workers=-1)[:, :h, :w]
  contrast, mean = rng.uniform(0.3, 1.2), 128 + rng.uniform(-20, 20)
  return mean + LUMINANCE_STD * contrast * image_TxHxW


def _video(rng, spec: Spec) -> np.ndarray:
  """uint8 [T, H, W]: segments of 1-2 s, each a fresh image (a saccade-like jump)."""
  frames, pieces = spec.trial_samples, []
  shortest, longest = round(spec.rate), round(2 * spec.rate)
  while sum(len(p) for p in pieces) < frames:
    pieces.append(_segment(rng, spec, int(rng.integers(shortest, longest + 1))))
  video_TxHxW = np.concatenate(pieces)[:frames]
  return np.clip(np.round(video_TxHxW), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def stimulus(spec: Spec, stimulus_id: int) -> np.ndarray:
  """uint8 [T, H, W] (read-only) video of stimulus `stimulus_id`; T = spec.trial_samples."""
  if stimulus_id < 0:
    raise ValueError(f'stimulus_id={stimulus_id}; need >= 0')
  video_TxHxW = _video(_rng(spec, _STIMULUS, stimulus_id), spec)
  video_TxHxW.setflags(write=False)
  return video_TxHxW


# ----------------------------------------------------------------------------- behaviour

def _smooth(x_T, tau_samples: float, passes: int = 1) -> np.ndarray:
  """Causal exponential low-pass, `passes` times, with unit DC gain."""
  d = math.exp(-1 / tau_samples)
  for _ in range(passes):
    x_T = scipy.signal.lfilter([1 - d], [1, -d], x_T, zi=[d * x_T[0]])[0]
  return x_T


def _ou(rng, samples: int, tau_samples: float, std: float, kicks_T=None) -> np.ndarray:
  """Ornstein-Uhlenbeck process of stationary std `std` (plus decaying kicks), mean 0."""
  d = math.exp(-1 / tau_samples)
  drive_T = rng.normal(0, std * math.sqrt(1 - d * d), samples)
  drive_T[0] = rng.normal(0, std)
  if kicks_T is not None:
    drive_T += kicks_T
  return scipy.signal.lfilter([1], [1, -d], drive_T)


def _running(rng, samples: int, rate: float) -> np.ndarray:
  """cm/s: still periods (~8 s) and running bouts (~6 s) at a bout speed, smoothed, >= 0."""
  target_T, t, running = np.zeros(samples), 0, rng.random() < 0.4
  while t < samples:
    n = max(1, int(rng.exponential(6.0 if running else 8.0) * rate))
    target_T[t:t + n] = rng.uniform(8, 30) if running else 0.0
    t, running = t + n, not running
  wobble_T = np.clip(1 + _ou(rng, samples, rate, 0.2), 0, None)
  return _smooth(target_T * wobble_T, 0.5 * rate, passes=2)


def behavior_times(spec: Spec, animal: int, session: int) -> np.ndarray:
  """float64 [S] seconds of the behaviour clock: behavior_rate with a random phase, covering
  the session's neural clock [0, (T - 1) / rate] with a sample to spare at both ends."""
  phase = _rng(spec, _BEHAVIOR, animal, session, 0).uniform(0.1, 0.9) / spec.behavior_rate
  duration = spec.trials * spec.trial_samples / spec.rate
  samples = math.ceil(duration * spec.behavior_rate) + 3
  return (np.arange(samples) - 1) / spec.behavior_rate - phase


def behavior(spec: Spec, animal: int, session: int) -> np.ndarray:
  """float32 [S, 5] in CHANNELS order at behavior_times(spec, animal, session)."""
  rng, rate = _rng(spec, _BEHAVIOR, animal, session, 1), spec.behavior_rate
  samples = len(behavior_times(spec, animal, session))
  running_S = _running(rng, samples, rate)
  fluctuation_S = _smooth(_ou(rng, samples, 4.0 * rate, 2.5), 0.5 * rate, passes=2)
  size_S = PUPIL_MEAN + 0.35 * (_smooth(running_S, 2.0 * rate) - RUNNING_MEAN) + fluctuation_S
  size_S = np.clip(size_S, 3.0, None)
  change_S = np.gradient(size_S, 1 / rate)
  centre_Sx2 = np.stack([
      base + _ou(rng, samples, 2.0 * rate, 1.5,
                 kicks_T=(rng.random(samples) < 0.15 / rate) * rng.normal(0, 5, samples))
      for base in (160.0, 120.0)], axis=-1)
  return np.column_stack([centre_Sx2, size_S, change_S, running_S]).astype(F32)


def _interpolate(times_T, behavior_times_S, behavior_SxC) -> np.ndarray:
  """float32 [T, C]: behaviour linearly interpolated to `times_T` (as the store aligns it)."""
  return np.stack([np.interp(times_T, behavior_times_S, b_S) for b_S in behavior_SxC.T],
                  axis=-1).astype(F32)


# ----------------------------------------------------------------------------- neurons

def _gabors(spec: Spec, centre_Px2, orientation_P, wavelength_P, phase_P, sigma_P):
  """Even and odd Gabors [P, H, W] float32: zero mean, unit norm."""
  h, w = spec.frame_shape
  y_H, x_W = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
  dx_PxHxW = x_W[None, None, :] - centre_Px2[:, 0, None, None]
  dy_PxHxW = y_H[None, :, None] - centre_Px2[:, 1, None, None]
  c, s = np.cos(orientation_P)[:, None, None], np.sin(orientation_P)[:, None, None]
  along_PxHxW = c * dx_PxHxW + s * dy_PxHxW
  envelope_PxHxW = np.exp(-(dx_PxHxW ** 2 + dy_PxHxW ** 2) / (2 * sigma_P[:, None, None] ** 2))
  carrier = 2 * np.pi * along_PxHxW / wavelength_P[:, None, None] + phase_P[:, None, None]
  pair = []
  for wave_PxHxW in (np.cos(carrier), np.sin(carrier)):
    g_PxHxW = envelope_PxHxW * wave_PxHxW
    dc_P = g_PxHxW.sum((1, 2)) / envelope_PxHxW.sum((1, 2))
    g_PxHxW = g_PxHxW - dc_P[:, None, None] * envelope_PxHxW
    pair.append((g_PxHxW / np.linalg.norm(g_PxHxW, axis=(1, 2), keepdims=True)).astype(F32))
  return pair


def _temporal(rng, spec: Spec, count: int) -> np.ndarray:
  """Biphasic kernels [P, K] over the last K samples (k = 0: the current frame), unit norm."""
  t_K = np.arange(max(2, round(0.27 * spec.rate))) / spec.rate
  latency_P = 0.05 + rng.uniform(-0.01, 0.02, count)
  fast_PxK = np.exp(-(t_K - latency_P[:, None]) ** 2 / (2 * 0.03 ** 2))
  slow_PxK = np.exp(-(t_K - 2.5 * latency_P[:, None]) ** 2 / (2 * 0.05 ** 2))
  rebound_P = rng.uniform(0.3, 0.8, count)
  kernel_PxK = (fast_PxK / fast_PxK.sum(1, keepdims=True)
                - rebound_P[:, None] * slow_PxK / slow_PxK.sum(1, keepdims=True))
  return (kernel_PxK / np.linalg.norm(kernel_PxK, axis=1, keepdims=True)).astype(F32)


def _retinotopy(rng, spec: Spec, positions_Px3) -> np.ndarray:
  """RF centres [P, 2] (x, y pixels): cortical x, y mapped onto the screen, plus jitter."""
  h, w = spec.frame_shape
  low_2, high_2 = 0.15 * np.array([w, h]), 0.85 * np.array([w, h])
  centre_Px2 = low_2 + positions_Px3[:, :2] / CORTEX_UM * (high_2 - low_2)
  return np.clip(centre_Px2 + rng.normal(0, 0.05 * h, centre_Px2.shape), 0, [w - 1, h - 1])


def _unit_ids(spec: Spec, animal: int) -> np.ndarray:
  """Numeric unit ids (str), unique across animals: animal * pool + k."""
  return np.array([str(animal * spec.pool + k) for k in range(spec.pool)])


def neurons(spec: Spec, animal: int) -> dict:
  """Tuning of all spec.pool neurons of `animal` (arrays with a leading [P] axis).

  Keys: unit_ids, positions (um), complex, centre (x, y px), orientation, wavelength (px),
  phase, sigma (px), even, odd ([P, H, W] Gabors), temporal ([P, K]), threshold,
  running, pupil (log-gain coefficients), adaptation, drive_mean, drive_std.
  """
  rng, p = _rng(spec, _NEURONS, animal), spec.pool
  h, w = spec.frame_shape
  positions_Px3 = np.column_stack([rng.uniform(0, CORTEX_UM, (p, 2)), rng.uniform(150, 350, p)])
  wavelength_P = rng.uniform(0.25, 0.55, p) * h
  tuning = {
      'unit_ids': _unit_ids(spec, animal),
      'positions': positions_Px3.astype(F32),
      'complex': rng.random(p) < spec.complex_fraction,
      'centre': _retinotopy(rng, spec, positions_Px3).astype(F32),
      'orientation': rng.uniform(0, np.pi, p).astype(F32),
      'wavelength': wavelength_P.astype(F32),
      'phase': rng.uniform(0, 2 * np.pi, p).astype(F32),
      'sigma': (wavelength_P * rng.uniform(0.3, 0.5, p)).astype(F32),
      'temporal': _temporal(rng, spec, p),
      'threshold': rng.uniform(0.0, 1.0, p).astype(F32),
      'running': rng.normal(spec.running_gain / 2, spec.running_gain, p).astype(F32),
      'pupil': rng.normal(0, spec.pupil_gain, p).astype(F32),
      'adaptation': rng.uniform(0.0, 0.3, p).astype(F32),
  }
  tuning['even'], tuning['odd'] = _gabors(
      spec, tuning['centre'].astype(np.float64), tuning['orientation'].astype(np.float64),
      wavelength_P, tuning['phase'].astype(np.float64), tuning['sigma'].astype(np.float64))
  raw_TxP = _raw_drive(tuning, _calibration(spec))
  tuning['drive_mean'] = raw_TxP.mean(0).astype(F32)
  tuning['drive_std'] = np.maximum(raw_TxP.std(0), 1e-6).astype(F32)
  return tuning


def select(tuning: dict, index_N) -> dict:
  """The tuning of neurons `index_N` of a pool."""
  return {key: value[index_N] for key, value in tuning.items()}


def session_neurons(spec: Spec, session: int) -> np.ndarray:
  """Pool indices [N] of a session's neurons: the shared ones and its own, in a shuffled order
  (the same for every animal)."""
  shared, own = spec.shared_neurons, spec.neurons - spec.shared_neurons
  index_N = np.concatenate([np.arange(shared), shared + session * own + np.arange(own)])
  return _rng(spec, _MEMBERS, session).permutation(index_N)


@functools.lru_cache(maxsize=4)
def _calibration(spec: Spec) -> np.ndarray:
  """uint8 [T, H, W]: the stimulus ensemble on which drives are normalised."""
  return np.concatenate([_video(_rng(spec, _CALIBRATION, k), spec)
                         for k in range(CALIBRATION_STIMULI)])


# ----------------------------------------------------------------------------- responses

def _causal(x_TxP, kernel_PxK) -> np.ndarray:
  """y[t] = sum_k kernel[k] x[t - k], with x before t = 0 held at x[0]."""
  y_TxP = np.zeros_like(x_TxP)
  for k in range(kernel_PxK.shape[1]):
    past_TxP = np.concatenate([np.repeat(x_TxP[:1], k, axis=0), x_TxP[:len(x_TxP) - k]])
    y_TxP += kernel_PxK[:, k] * past_TxP
  return y_TxP


def linear_drive(tuning: dict, frames_TxHxW) -> tuple[np.ndarray, np.ndarray]:
  """Even and odd Gabor drives [T, P] float32 after the temporal kernel."""
  t = len(frames_TxHxW)
  x_TxD = (np.asarray(frames_TxHxW, F32).reshape(t, -1) - 128) / 64
  p = len(tuning['even'])
  filters_Dx2P = np.concatenate([tuning['even'].reshape(p, -1), tuning['odd'].reshape(p, -1)]).T
  projection_Tx2P = x_TxD @ filters_Dx2P
  kernel_2PxK = np.concatenate([tuning['temporal'], tuning['temporal']])
  drive_Tx2P = _causal(projection_Tx2P, kernel_2PxK)
  return drive_Tx2P[:, :p], drive_Tx2P[:, p:]


def _raw_drive(tuning: dict, frames_TxHxW) -> np.ndarray:
  """[T, P]: the even drive for simple cells, sqrt(even^2 + odd^2) for complex cells."""
  even_TxP, odd_TxP = linear_drive(tuning, frames_TxHxW)
  return np.where(tuning['complex'], np.sqrt(even_TxP ** 2 + odd_TxP ** 2), even_TxP)


def drive(tuning: dict, frames_TxHxW) -> np.ndarray:
  """[T, P] float32: each neuron's drive in stds of the calibration ensemble (mean 0 there)."""
  return (_raw_drive(tuning, frames_TxHxW) - tuning['drive_mean']) / tuning['drive_std']


def _adapted(spec: Spec, tuning: dict, drive_TxP) -> np.ndarray:
  """Drive minus adaptation * (slow average of its positive part up to the previous sample)."""
  d = math.exp(-1 / (ADAPT_SECONDS * spec.rate))
  positive_TxP = np.maximum(drive_TxP, 0)
  average_TxP = scipy.signal.lfilter([1 - d], [1, -d], positive_TxP, axis=0,
                                     zi=d * positive_TxP[:1])[0]
  previous_TxP = np.concatenate([average_TxP[:1], average_TxP[:-1]])
  return drive_TxP - tuning['adaptation'] * previous_TxP


def behavior_z(behavior_TxC) -> tuple[np.ndarray, np.ndarray]:
  """Saturating z-scores [T] of running speed and pupil size: tanh((x - mean) / std)."""
  behavior_TxC = np.asarray(behavior_TxC, F32)
  running_T = (behavior_TxC[:, CHANNELS.index('running_speed')] - RUNNING_MEAN) / RUNNING_STD
  pupil_T = (behavior_TxC[:, CHANNELS.index('pupil_size')] - PUPIL_MEAN) / PUPIL_STD
  return np.tanh(running_T), np.tanh(pupil_T)


def gain(tuning: dict, behavior_TxC) -> np.ndarray:
  """[T, P] float32 multiplicative gain exp(a * running_z + b * pupil_z)."""
  running_T, pupil_T = behavior_z(behavior_TxC)
  return np.exp(tuning['running'] * running_T[:, None] + tuning['pupil'] * pupil_T[:, None])


def rates(spec: Spec, tuning: dict, frames_TxHxW, behavior_TxC) -> np.ndarray:
  """float32 [T, P] expected spikes per sample, behaviour on the neural clock:
  peak_rate * gain * s(f(u)), f(u) = softplus(SLOPE (u - threshold)) normalised to 1 at
  u = STRONG_DRIVE, s(f) = f (1 + 1/c) / (1 + f/c) saturating at 1 + c (c = SATURATION)."""
  u_TxP = _adapted(spec, tuning, drive(tuning, frames_TxHxW))
  threshold_P = tuning['threshold']
  shape_TxP = (np.logaddexp(0, SLOPE * (u_TxP - threshold_P))
               / np.logaddexp(0, SLOPE * (STRONG_DRIVE - threshold_P)))
  saturated_TxP = shape_TxP * (1 + 1 / SATURATION) / (1 + shape_TxP / SATURATION)
  return (spec.peak_rate * gain(tuning, behavior_TxC) * saturated_TxP).astype(F32)


def _calcium(spec: Spec, spikes_TxN) -> np.ndarray:
  """Spikes (or rates) through the exponential calcium kernel (unit jump per spike)."""
  d = math.exp(-1 / (spec.calcium_tau * spec.rate))
  return scipy.signal.lfilter([1], [1, -d], spikes_TxN, axis=0).astype(F32)


def _observe(spec: Spec, rng, rates_TxN) -> tuple[np.ndarray, np.ndarray]:
  """(responses, their expectation), both [T, N] float32, under spec.noise."""
  spikes_TxN = rng.poisson(rates_TxN).astype(F32)
  if spec.noise == 'poisson':
    return spikes_TxN, rates_TxN
  noise_TxN = rng.normal(0, spec.calcium_noise, rates_TxN.shape).astype(F32)
  return _calcium(spec, spikes_TxN) + noise_TxN, _calcium(spec, rates_TxN)


# ----------------------------------------------------------------------------- sessions

def trials(spec: Spec, animal: int, session: int) -> dict:
  """Trials of a session back to back in a shuffled order: start, stop (samples), tier, stimulus.

  Repeat stimuli are 0 .. repeat_stimuli - 1 everywhere; train and validation stimuli are
  fresh ids, unique across all sessions and animals.
  """
  fresh = spec.train_trials + spec.validation_trials
  first = spec.repeat_stimuli + (animal * spec.sessions_per_animal + session) * fresh
  stimulus_K = np.concatenate([first + np.arange(fresh),
                               np.repeat(np.arange(spec.repeat_stimuli), spec.repeats)])
  tier_K = np.array(['train'] * spec.train_trials + ['validation'] * spec.validation_trials
                    + ['repeats'] * (spec.repeat_stimuli * spec.repeats))
  order_K = _rng(spec, _TRIALS, animal, session).permutation(len(tier_K))
  start_K = np.arange(len(tier_K)) * spec.trial_samples
  return {'start': start_K, 'stop': start_K + spec.trial_samples,
          'tier': tier_K[order_K].tolist(), 'stimulus': stimulus_K[order_K]}


def simulate_session(spec: Spec, animal: int, session: int) -> dict:
  """Session `session` of `animal`: responses with their true rates and everything the store
  needs. 'rates' is the expected value of 'responses' (for calcium: the rates through the
  calcium kernel; 'spike_rates' are the rates themselves). 'pool_index' [N] indexes
  neurons(spec, animal)."""
  if not (0 <= animal < spec.animals and 0 <= session < spec.sessions_per_animal):
    raise ValueError(f'animal={animal}, session={session}; need 0 <= animal < {spec.animals}, '
                     f'0 <= session < {spec.sessions_per_animal}')
  pool_index_N = session_neurons(spec, session)
  tuning = select(neurons(spec, animal), pool_index_N)
  trial = trials(spec, animal, session)
  frames_TxHxW = np.concatenate([stimulus(spec, int(k)) for k in trial['stimulus']])
  times_T = np.arange(len(frames_TxHxW)) / spec.rate
  behavior_times_S = behavior_times(spec, animal, session)
  behavior_SxC = behavior(spec, animal, session)
  spike_rates_TxN = rates(spec, tuning, frames_TxHxW,
                          _interpolate(times_T, behavior_times_S, behavior_SxC))
  responses_TxN, rates_TxN = _observe(spec, _rng(spec, _NOISE, animal, session), spike_rates_TxN)
  return {'responses': responses_TxN, 'rates': rates_TxN, 'spike_rates': spike_rates_TxN,
          'frames': frames_TxHxW, 'frame_times': times_T,
          'behavior': behavior_SxC, 'behavior_times': behavior_times_S,
          'unit_ids': tuning['unit_ids'].tolist(), 'positions': tuning['positions'],
          'areas': ['V1'] * len(pool_index_N), 'trials': trial, 'pool_index': pool_index_N}
