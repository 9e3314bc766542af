"""What a neural store holds beside the responses, built alike by every source of sessions.

The behaviour channels (CHANNELS, in store order) and 8-bit grey frames, shared by the
importers (sensorium.py, nwb.py) and the simulated population (synthetic/v1.py). numpy
only: simulating a population needs neither tensorstore nor Grain.
"""

import numpy as np

CHANNELS = ('pupil_x', 'pupil_y', 'pupil_size', 'pupil_size_change', 'running_speed')


def behavior_TxC(*, pupil_x_T, pupil_y_T, pupil_size_T, running_speed_T,
                 rate: float) -> np.ndarray:
  """float32 [T, 5] in CHANNELS order; pupil_size_change is d(pupil size)/dt per second
  (samples at `rate` Hz; NaN for a single sample)."""
  size_T = np.asarray(pupil_size_T)
  change_T = np.gradient(size_T) * rate if len(size_T) > 1 else np.full_like(size_T, np.nan)
  channels = {'pupil_x': pupil_x_T, 'pupil_y': pupil_y_T, 'pupil_size': size_T,
              'pupil_size_change': change_T, 'running_speed': running_speed_T}
  return np.stack([channels[c] for c in CHANNELS], axis=1).astype(np.float32)


def uint8_frames(frames, scale: float = 1) -> np.ndarray:
  """0..255 uint8 of float frames times `scale`: rounded, clipped, NaN pixels 0."""
  return np.clip(np.rint(np.nan_to_num(np.asarray(frames, np.float32) * scale)),
                 0, 255).astype(np.uint8)
