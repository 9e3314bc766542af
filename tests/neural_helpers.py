"""Shared by the neural tests: random sessions written with neural.write_session, direct numpy
computations on the arrays written, and simulated sessions written as NWB files by pynwb."""

import datetime

import numpy as np
import pynwb
from pynwb import behavior as nb
from pynwb import image, ophys

from brainscale.data import neural

RATE = 30.0
FRAME_RATE = 20.0
FRAME_SHAPE = (6, 8)


def fake_session(rng, *, neurons=12, samples=None, animal='a0', units=None, tiers=None):
  """write_session's keyword arguments for a random session: responses with NaN and negative
  values, frames at FRAME_RATE with a gap, behaviour on an irregular clock with NaN, trials
  of random lengths (some gaps between them) with random tiers (at least one train)."""
  t = samples or int(rng.integers(300, 450))
  units = list(range(neurons)) if units is None else list(units)
  n = len(units)
  responses_TxN = (rng.normal(1.0, 1.5, (t, n)) * rng.uniform(0.5, 4.0, n)).astype(np.float32)
  responses_TxN[rng.random((t, n)) < 0.05] = np.nan
  frame_times_F = np.arange(-0.1, t / RATE + 0.2, 1 / FRAME_RATE)
  gap = int(rng.integers(20, len(frame_times_F) - 30))
  frame_times_F = np.delete(frame_times_F, np.arange(gap, gap + 6))   # 0.35 s without frames
  frames_FxHxW = rng.integers(0, 256, (len(frame_times_F), *FRAME_SHAPE), dtype=np.uint8)
  behavior_times_S = np.sort(rng.uniform(0.05, t / RATE - 0.05, 2 * t))   # inside the session
  behavior_SxC = rng.normal(rng.uniform(-5, 5, 5), rng.uniform(0.5, 3, 5), (2 * t, 5))
  behavior_SxC[rng.random(behavior_SxC.shape) < 0.03] = np.nan
  return dict(animal=animal, rate=RATE, responses_TxN=responses_TxN, frames_FxHxW=frames_FxHxW,
              frame_times_F=frame_times_F, behavior_SxC=behavior_SxC,
              behavior_times_S=behavior_times_S, unit_ids=[f'u{u}' for u in units],
              trials=fake_trials(rng, t, tiers), positions_Nx3=rng.uniform(0, 600, (n, 3)),
              areas=[str(a) for a in rng.choice(['V1', 'LM'], n)])


def fake_trials(rng, samples, tiers=None):
  start, stop, pos = [], [], int(rng.integers(0, 5))
  while pos + 20 <= samples:
    length = int(rng.integers(20, min(120, samples - pos) + 1))
    start.append(pos)
    stop.append(pos + length)
    pos += length + int(rng.integers(0, 8))
  tier = list(rng.choice(tiers or neural.TIERS, len(start)))
  tier[int(rng.integers(len(tier)))] = 'train'
  return {'start': np.array(start), 'stop': np.array(stop), 'tier': tier,
          'stimulus': rng.integers(0, 50, len(start))}


def build(root, rng, sessions):
  """Writes sessions {name: fake_session kwargs} and returns {name: the data written}."""
  written = {}
  for name, kwargs in sessions.items():
    written[name] = fake_session(rng, **kwargs)
    neural.write_session(root, name, **written[name])
  return written


def train_rows(data):
  t = len(data['responses_TxN'])
  rows_T = np.zeros(t, bool)
  for start, stop, tier in zip(*(data['trials'][k] for k in ('start', 'stop', 'tier'))):
    rows_T[start:stop] |= tier == 'train'
  return rows_T


def timestamps(data):
  return np.arange(len(data['responses_TxN'])) / data['rate']


def aligned(data):
  return neural.align_behavior(timestamps(data), data['behavior_times_S'], data['behavior_SxC'])


def frame_of_each_sample(data):
  """frames [T, H, W] of each neural sample (zeros where none) and which samples have one."""
  index_T = neural.nearest_frame(timestamps(data), data['frame_times_F'])
  frames_TxHxW = np.where((index_T >= 0)[:, None, None], data['frames_FxHxW'][index_T], 0)
  return frames_TxHxW.astype(np.uint8), index_T >= 0


def write_simulated_nwb(path, session, rate=30.0):
  """One simulated session written with pynwb's own API (traces, behaviour, stimulus, trials)."""
  f = pynwb.NWBFile(session_description='simulated V1', identifier=path.stem,
                    session_start_time=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
                    subject=pynwb.file.Subject(subject_id=path.stem, species='Mus musculus'))
  responses = session['responses']
  plane = f.create_imaging_plane(
      name='plane', optical_channel=ophys.OpticalChannel(name='green', description='g',
                                                         emission_lambda=510.0),
      description='L2/3', device=f.create_device(name='scope'), excitation_lambda=920.0,
      indicator='GCaMP6s', location='VISp', imaging_rate=rate)
  module = f.create_processing_module(name='ophys', description='calcium')
  segmentation = ophys.ImageSegmentation()
  module.add(segmentation)
  rois = segmentation.create_plane_segmentation(name='rois', description='cells',
                                                imaging_plane=plane)
  for _ in range(responses.shape[1]):
    rois.add_roi(image_mask=np.ones((2, 2)))
  region = rois.create_roi_table_region(region=list(range(responses.shape[1])), description='all')
  dff = ophys.DfOverF()
  module.add(dff)
  dff.add_roi_response_series(ophys.RoiResponseSeries(
      name='dff', data=responses, rois=region, unit='1', rate=rate, starting_time=0.0))
  behavior, times = session['behavior'], session['behavior_times']
  eye = f.create_processing_module(name='behavior', description='eye and wheel')
  eye.add(nb.EyeTracking(spatial_series=nb.SpatialSeries(
      name='pupil_position', data=behavior[:, :2], reference_frame='screen', timestamps=times)))
  eye.add(nb.PupilTracking(time_series=pynwb.TimeSeries(
      name='pupil_size', data=behavior[:, 2], unit='a.u.', timestamps=times)))
  f.add_acquisition(nb.BehavioralTimeSeries(time_series=pynwb.TimeSeries(
      name='running_speed', data=behavior[:, 4], unit='cm/s', timestamps=times)))
  f.add_stimulus(image.OpticalSeries(
      name='movie', data=session['frames'], unit='n.a.', distance=0.1, field_of_view=[0.2, 0.3],
      orientation='lower left', timestamps=session['frame_times']))
  f.add_trial_column('tier', 'store tier')
  f.add_trial_column('stimulus', 'stimulus id')
  trials = session['trials']
  for k in range(len(trials['start'])):
    f.add_trial(start_time=trials['start'][k] / rate, stop_time=trials['stop'][k] / rate,
                tier=str(trials['tier'][k]), stimulus=int(trials['stimulus'][k]))
  with pynwb.NWBHDF5IO(str(path), 'w') as io:
    io.write(f)
