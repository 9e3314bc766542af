"""Sensorium and NWB importers: files written here → a neural store → read back.

Sensorium folders are written with numpy (random trials, NaN padding, repeated videos);
NWB files with pynwb's own API. Stored arrays are compared to numpy references.
"""

import datetime
import shutil

import av
import numpy as np
import pynwb
import pytest
from absl import flags
from pynwb.base import TimeSeries
from pynwb.behavior import BehavioralTimeSeries, EyeTracking, PupilTracking, SpatialSeries
from pynwb.image import ImageSeries, OpticalSeries
from pynwb.ophys import DfOverF, ImageSegmentation, OpticalChannel, RoiResponseSeries

from brainscale.data import neural
from brainscale.data.importers import nwb, sensorium

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()   # Grain reads absl flags

RATE = 30.0
H, W = 6, 8   # Sensorium frames, and the NWB import's frame_shape
# trial id: (tier, video key, real frames, padding frames, what the padding is NaN in)
TRIALS = {0: ('train', 'a', 9, 3, 'video'), 1: ('train', 'b', 12, 0, ''),
          2: ('oracle', 'c', 8, 2, 'responses'), 3: ('oracle', 'c', 8, 4, 'video'),
          4: ('none', 'd', 10, 0, ''), 10: ('live_test_main', 'b', 12, 1, 'both')}
KEPT = [0, 1, 2, 3, 10]   # numeric order; trial 4 is 'none'


# ---------------------------------------------------------------- Sensorium

def write_sensorium(folder, rng, neurons: int = 7) -> dict:
  """A Sensorium 2023 mouse folder; returns {trial: (video HxWxF, responses NxF, behavior 2xF,
  pupil_center 2xF)} without the padding."""
  for part in ('data/videos', 'data/responses', 'data/behavior', 'data/pupil_center',
               'meta/neurons', 'meta/trials'):
    (folder / part).mkdir(parents=True)
  videos = {k: rng.uniform(-20, 275, (H, W, 12)) for k in 'abcd'}
  kept = {}
  for trial, (_, key, frames, pad, padded) in TRIALS.items():
    arrays = [videos[key][..., :frames], rng.gamma(1.0, 1.0, (neurons, frames)),
              rng.normal(size=(2, frames)), rng.normal(size=(2, frames))]
    arrays[1][rng.integers(neurons), rng.integers(frames - 1)] = np.nan   # kept: not trailing
    arrays[1][0, frames - 1] = np.nan                                     # kept: not all neurons
    kept[trial] = arrays
    padded_arrays = [np.concatenate([a, rng.normal(size=(*a.shape[:-1], pad))], -1)
                     for a in arrays]
    if pad and padded in ('video', 'both'):
      padded_arrays[0][..., frames:] = np.nan
    if pad and padded in ('responses', 'both'):
      padded_arrays[1][:, frames:] = np.nan
    for name, array in zip(('videos', 'responses', 'behavior', 'pupil_center'), padded_arrays):
      np.save(folder / 'data' / name / f'{trial}.npy', array.astype(np.float32))
  tiers = np.array([TRIALS.get(k, ('none',))[0] for k in range(11)])
  np.save(folder / 'meta/trials/tiers.npy', tiers)
  np.save(folder / 'meta/neurons/unit_ids.npy', np.arange(100, 100 + neurons))
  np.save(folder / 'meta/neurons/cell_motor_coordinates.npy', rng.uniform(0, 500, (neurons, 3)))
  return kept


def sensorium_reference(kept: dict) -> dict:
  """What the store should hold: trials back to back, frames uint8, derived pupil change."""
  parts = [kept[k] for k in KEPT]
  f32 = lambda x: x.astype(np.float32)
  behavior = [np.stack([f32(p[3][0]), f32(p[3][1]), f32(p[2][0]),
                        np.gradient(f32(p[2][0]).astype(np.float64)) * RATE, f32(p[2][1])], 1)
              for p in parts]
  return {'responses': np.concatenate([f32(p[1]).T for p in parts]),
          'frames': np.concatenate([np.clip(np.rint(f32(p[0])), 0, 255).astype(np.uint8)
                                    .transpose(2, 0, 1) for p in parts]),
          'behavior': np.concatenate(behavior).astype(np.float32),
          'lengths': [p[0].shape[-1] for p in parts]}


@pytest.fixture
def mouse(tmp_path, rng):
  folder = tmp_path / 'dynamic123-4-5-Video-abc'
  return folder, write_sensorium(folder, rng)


def test_sensorium_import_reads_back(mouse, tmp_path):
  folder, kept = mouse
  name = sensorium.import_sensorium(folder, tmp_path / 'store', progress=False)
  assert name == folder.name
  store = neural.Store(tmp_path / 'store')
  session = store.session(name)
  reference = sensorium_reference(kept)
  assert session.animal == 'dynamic123'
  assert session.unit_ids == [str(u) for u in range(100, 107)]
  np.testing.assert_allclose(session.positions,
                             np.load(folder / 'meta/neurons/cell_motor_coordinates.npy'),
                             rtol=1e-6)
  data = session.read(0, session.num_samples)
  np.testing.assert_array_equal(data['responses'], reference['responses'])
  np.testing.assert_array_equal(data['frames'], reference['frames'])
  assert data['frame_valid'].all()
  np.testing.assert_allclose(data['behavior'], reference['behavior'], rtol=1e-5, atol=1e-5)
  trials = session.trials
  assert trials['tier'].tolist() == ['train', 'train', 'repeats', 'repeats', 'test']
  assert (trials['stop'] - trials['start']).tolist() == reference['lengths'] == [9, 12, 8, 8, 12]
  assert trials['start'][0] == 0 and (trials['start'][1:] == trials['stop'][:-1]).all()
  stimulus = trials['stimulus']   # videos a, b, c, c, b
  assert stimulus[2] == stimulus[3] and stimulus[1] == stimulus[4]
  assert len(set(stimulus.tolist())) == 3


def test_sensorium_cli(mouse, tmp_path, capsys):
  folder, _ = mouse
  args = [str(folder), str(tmp_path / 'store'), '--session', 's1', '--animal', 'm1']
  assert sensorium.main(args) == 0
  assert neural.Store(tmp_path / 'store').session('s1').animal == 'm1'
  out = capsys.readouterr().out
  assert "5 trials (train 2, repeats 2, test 1), 49 samples, 7 neurons" in out
  assert "skipped 1 tier 'none', 0 empty after trimming" in out
  assert sensorium.main(args + ['--quiet']) == 2   # exists already
  err = capsys.readouterr().err
  assert err.count('brainscale:') == 1 and "session 's1' already exists" in err


def _delete(path):
  shutil.rmtree(path) if path.is_dir() else path.unlink()


def _resave(path, change):
  np.save(path, change(np.load(path)))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:200])   # the header and part of the data


BREAKAGES = {   # name: (how the folder is broken, what the error names)
    'responses folder': (lambda f: _delete(f / 'data/responses'), 'data/responses'),
    'pupil_center folder': (lambda f: _delete(f / 'data/pupil_center'), 'data/pupil_center'),
    'tiers': (lambda f: _delete(f / 'meta/trials/tiers.npy'), 'tiers.npy'),
    'unit_ids file': (lambda f: _delete(f / 'meta/neurons/unit_ids.npy'), 'unit_ids.npy'),
    'trial file': (lambda f: _delete(f / 'data/responses/10.npy'), 'data/responses/10.npy'),
    'unit_ids': (lambda f: _resave(f / 'meta/neurons/unit_ids.npy', lambda u: u[:-1]),
                 'unit_ids'),
    'neurons': (lambda f: _resave(f / 'data/responses/2.npy', lambda r: r[:-1]),
                'data/responses/2.npy'),
    'frames': (lambda f: _resave(f / 'data/behavior/3.npy', lambda b: b[:, :-1]),
               'data/behavior/3.npy'),
    'truncated': (lambda f: _truncate(f / 'data/videos/3.npy'), 'data/videos/3.npy'),
}


@pytest.mark.parametrize('breakage', list(BREAKAGES))
def test_sensorium_missing_part_names_it(mouse, tmp_path, breakage):
  folder, _ = mouse
  breaks, named = BREAKAGES[breakage]
  breaks(folder)
  with pytest.raises(ValueError, match='expected') as error:
    sensorium.import_sensorium(folder, tmp_path / 'store', progress=False)
  assert named in str(error.value)
  assert not (tmp_path / 'store').exists()


# ---------------------------------------------------------------- NWB

START = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)
BEHAVIOR = ('pupil_position', 'pupil_area', 'running_speed')
NWB_TRIALS = [(0.5, 1.5, 'train', 0), (1.5, 2.5, 'repeats', 1), (2.5, 3.4, 'repeats', 1),
              (1.0, 2.0, 'validation', 2), (20.0, 21.0, 'test', 3)]   # the last: outside


def _calcium(nwbfile, rng) -> dict:
  device = nwbfile.create_device(name='scope')
  plane = nwbfile.create_imaging_plane(
      name='plane', optical_channel=OpticalChannel(name='green', description='g',
                                                   emission_lambda=510.0),
      description='L2/3', device=device, excitation_lambda=920.0, indicator='GCaMP6s',
      location='VISp', imaging_rate=9.7)
  ophys = nwbfile.create_processing_module(name='ophys', description='calcium')
  segmentation = ImageSegmentation()
  ophys.add(segmentation)
  rois = segmentation.create_plane_segmentation(name='rois', description='cells',
                                                imaging_plane=plane)
  rois.add_column('x', 'um')
  rois.add_column('y', 'um')
  xy = rng.uniform(0, 400, (5, 2))
  for n in range(5):
    rois.add_roi(image_mask=np.ones((4, 4)), x=xy[n, 0], y=xy[n, 1], id=40 + n)
  times = 0.2 + np.cumsum(rng.uniform(0.08, 0.12, 40))   # ~10 Hz, irregular
  traces = rng.normal(size=(40, 5))
  region = rois.create_roi_table_region(region=list(range(5)), description='all')
  dff = DfOverF()
  ophys.add(dff)
  dff.add_roi_response_series(RoiResponseSeries(name='dff', data=traces, rois=region, unit='1',
                                                timestamps=times))
  return {'times': times, 'traces': traces, 'unit_ids': [str(40 + n) for n in range(5)],
          'positions': np.pad(xy, ((0, 0), (0, 1)))}


def _units(nwbfile, rng) -> dict:
  spikes = [np.sort(rng.uniform(0.1, 3.9, rng.integers(5, 60))) for _ in range(4)]
  for n, times in enumerate(spikes):
    nwbfile.add_unit(spike_times=times, id=7 + n)
  return {'spikes': spikes, 'unit_ids': [str(7 + n) for n in range(4)]}


def _behavior(nwbfile, rng, names) -> dict:
  module = nwbfile.create_processing_module(name='behavior', description='eye and wheel')
  written = {}
  if 'pupil_position' in names:
    times = np.sort(rng.uniform(0, 4.2, 70))
    written['pupil_position'] = (times, rng.normal(size=(70, 2)))
    module.add(EyeTracking(spatial_series=SpatialSeries(
        name='pupil_position', data=written['pupil_position'][1], reference_frame='camera',
        timestamps=times)))
  if 'pupil_area' in names:
    written['pupil_area'] = (0.1 + np.arange(80) / 20, rng.uniform(1, 2, 80))
    module.add(PupilTracking(time_series=TimeSeries(
        name='pupil_area', data=written['pupil_area'][1], unit='px^2', rate=20.0,
        starting_time=0.1)))
  if 'running_speed' in names:
    written['running_speed'] = (np.arange(200) / 50, rng.normal(size=200))
    nwbfile.add_acquisition(BehavioralTimeSeries(time_series=TimeSeries(
        name='running_speed', data=written['running_speed'][1], unit='cm/s',
        timestamps=written['running_speed'][0])))
  return written


def write_nwb(path, rng, *, activity='calcium', behavior=BEHAVIOR, stimulus='in_file',
              trials=NWB_TRIALS, tier_column=True, extra=None) -> dict:
  """An NWB file with pynwb; returns what it holds, for the references. trials: rows
  (start, stop, tier, stimulus), or none; extra(nwbfile) adds more before it is written."""
  nwbfile = pynwb.NWBFile(session_description='importer test', identifier=path.stem,
                          session_start_time=START,
                          subject=pynwb.file.Subject(subject_id='mouse7', species='Mus musculus'))
  written = {'calcium': _calcium, 'units': _units}.get(activity, lambda *_: {})(nwbfile, rng)
  written['behavior'] = _behavior(nwbfile, rng, behavior)
  if stimulus == 'in_file':
    written['frames'] = rng.integers(0, 256, (45, 2 * H, 2 * W, 3), dtype=np.uint8)
    written['frame_times'] = 0.05 + np.arange(45) / 12
    nwbfile.add_stimulus(OpticalSeries(
        name='movie', data=written['frames'], unit='n.a.', distance=0.1, field_of_view=[0.2, 0.3],
        orientation='lower left', timestamps=written['frame_times']))
  elif stimulus == 'external':
    written['frame_times'] = 0.05 + np.arange(30) / 10
    nwbfile.add_stimulus(ImageSeries(name='movie', external_file=['movie.mp4'], format='external',
                                     starting_frame=[0], unit='n.a.',
                                     timestamps=written['frame_times']))
  if trials:
    if tier_column:
      nwbfile.add_trial_column('tier', 'store tier')
    nwbfile.add_trial_column('stimulus', 'stimulus id')
    for start, stop, tier, stimulus_id in trials:
      nwbfile.add_trial(start_time=start, stop_time=stop, stimulus=stimulus_id,
                        **({'tier': tier} if tier_column else {}))
  if extra:
    extra(nwbfile)
  with pynwb.NWBHDF5IO(str(path), 'w') as io:
    io.write(nwbfile)
  return written


def import_quietly(path, root, **kwargs):
  return nwb.import_nwb(path, root, frame_shape=(H, W), progress=False, **kwargs)


def interp(times_T, times_S, values_S):
  return np.interp(times_T, times_S, values_S, left=np.nan, right=np.nan)


def check_behavior(behavior_TxC, times_T, written):
  """Each channel against np.interp of what was written, NaN outside its time span."""
  position, area = written['pupil_position'], written['pupil_area']
  size_T = interp(times_T, *area)
  expected = {'pupil_x': interp(times_T, position[0], position[1][:, 0]),
              'pupil_y': interp(times_T, position[0], position[1][:, 1]), 'pupil_size': size_T,
              'pupil_size_change': np.gradient(size_T) * RATE,
              'running_speed': interp(times_T, *written['running_speed'])}
  for c, channel in enumerate(neural.CHANNELS):
    np.testing.assert_allclose(behavior_TxC[:, c], expected[channel], rtol=1e-4, atol=1e-4,
                               err_msg=channel)


def check_trials(session, times_T, kept=NWB_TRIALS[:-1]):
  assert session.trials['start'].tolist() == [np.searchsorted(times_T, t[0]) for t in kept]
  assert session.trials['stop'].tolist() == [np.searchsorted(times_T, t[1]) for t in kept]
  assert session.trials['tier'].tolist() == [t[2] for t in kept]
  assert session.trials['stimulus'].tolist() == [t[3] for t in kept]


def test_nwb_calcium_import(tmp_path, rng):
  written = write_nwb(tmp_path / 'calcium.nwb', rng)
  name = import_quietly(tmp_path / 'calcium.nwb', tmp_path / 'store')
  session = neural.Store(tmp_path / 'store').session(name)
  assert (name, session.animal, session.unit_ids) == ('calcium', 'mouse7', written['unit_ids'])
  np.testing.assert_allclose(session.positions, written['positions'], rtol=1e-6)
  assert session.areas == ['VISp'] * 5
  times_S = written['times']
  count = int(np.floor((times_S[-1] - times_S[0]) * RATE + 1e-6)) + 1
  times_T = times_S[0] + np.arange(count) / RATE
  data = session.read(0, session.num_samples)
  np.testing.assert_allclose(data['timestamps'], times_T)
  traces_TxN = np.stack([np.interp(times_T, times_S, x) for x in written['traces'].T], 1)
  np.testing.assert_allclose(data['responses'], traces_TxN, rtol=1e-5, atol=1e-5)
  check_behavior(data['behavior'], times_T, written['behavior'])
  check_trials(session, times_T)
  luma_FxHxW = written['frames'].astype(np.float64) @ [0.299, 0.587, 0.114]
  blocks_FxHxW = luma_FxHxW.reshape(-1, H, 2, W, 2).mean((2, 4))   # 2x2 area averages
  frames = session.array('frames').read().result()
  assert np.abs(frames.astype(int) - np.rint(blocks_FxHxW)).max() <= 1
  nearest_T = np.argmin(np.abs(times_T[:, None] - written['frame_times'][None]), 1)
  valid_T = np.abs(times_T - written['frame_times'][nearest_T]) <= 1 / 12
  np.testing.assert_array_equal(data['frame_valid'], valid_T)
  np.testing.assert_array_equal(data['frames'][valid_T], frames[nearest_T[valid_T]])


def test_nwb_units_import(tmp_path, rng, capsys):
  written = write_nwb(tmp_path / 'units.nwb', rng, activity='units')
  assert nwb.main([str(tmp_path / 'units.nwb'), str(tmp_path / 'store'), '--session', 'u1',
                   '--animal', 'm2', '--frame_shape', f'{H},{W}']) == 0
  assert 'binned spikes of 4 neurons' in capsys.readouterr().out
  session = neural.Store(tmp_path / 'store').session('u1')
  assert (session.animal, session.unit_ids) == ('m2', written['unit_ids'])
  first = min(min(s.min() for s in written['spikes']), min(t[0] for t in NWB_TRIALS))
  last = max(max(s.max() for s in written['spikes']), max(t[1] for t in NWB_TRIALS))
  count = int(np.floor((last - first) * RATE)) + 1
  edges = first + np.arange(count + 1) / RATE
  counts_TxN = np.stack([np.histogram(s, edges)[0] for s in written['spikes']], 1)
  data = session.read(0, session.num_samples)
  np.testing.assert_array_equal(data['responses'], counts_TxN)
  times_T = (edges[:-1] + edges[1:]) / 2   # bin centres
  np.testing.assert_allclose(data['timestamps'], times_T)
  check_behavior(data['behavior'], times_T, written['behavior'])
  check_trials(session, times_T, NWB_TRIALS)   # bins span the trials too: none left out
  np.testing.assert_array_equal(session.positions, np.zeros((4, 3)))


def write_movie(path, count: int):
  """Flat gray frames 40 + 5 i (H.264), 4H x 4W."""
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=10)
    stream.width, stream.height, stream.pix_fmt = 4 * W, 4 * H, 'yuv420p'
    for i in range(count):
      image = np.full((4 * H, 4 * W, 3), 40 + 5 * i, np.uint8)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')))
    container.mux(stream.encode(None))


def test_nwb_external_movie(tmp_path, rng):
  written = write_nwb(tmp_path / 'ext.nwb', rng, stimulus='external')
  write_movie(tmp_path / 'movie.mp4', 30)
  import_quietly(tmp_path / 'ext.nwb', tmp_path / 'store')   # times: the ImageSeries'
  frames = neural.Store(tmp_path / 'store').session('ext').array('frames').read().result()
  assert frames.shape == (30, H, W)
  np.testing.assert_allclose(frames.mean((1, 2)), 40 + 5 * np.arange(30), atol=3)
  with pytest.raises(ValueError, match='has 30 frames and 29 frame times'):
    import_quietly(tmp_path / 'ext.nwb', tmp_path / 'store', session='other',
                   movie=tmp_path / 'movie.mp4', movie_times=written['frame_times'][:-1])


MISSING = {   # name: (write_nwb arguments, what the error says)
    'stimulus': ({'stimulus': None}, 'no stimulus frames in .*ImageSeries/OpticalSeries'),
    'neural data': ({'activity': None}, r'no calcium traces \(processing/ophys DfOverF/'
                                        r'Fluorescence/RoiResponseSeries\) and no units table'),
    'running': ({'behavior': BEHAVIOR[:2]}, "no running_speed in .*'running'/'speed'"),
    'pupil size': ({'behavior': BEHAVIOR[::2]}, "no pupil_size in .*processing.'behavior'."),
}


@pytest.mark.parametrize('missing', list(MISSING))
def test_nwb_missing_part_names_it(tmp_path, rng, missing):
  arguments, message = MISSING[missing]
  write_nwb(tmp_path / 'part.nwb', rng, **arguments)
  with pytest.raises(ValueError, match=message):
    import_quietly(tmp_path / 'part.nwb', tmp_path / 'store')
  assert not (tmp_path / 'store').exists()


def test_nwb_missing_behavior_nan(tmp_path, rng):
  written = write_nwb(tmp_path / 'eye.nwb', rng, behavior=BEHAVIOR[:2], trials=False)
  import_quietly(tmp_path / 'eye.nwb', tmp_path / 'store', missing_behavior='nan')
  session = neural.Store(tmp_path / 'store').session('eye')
  behavior_TxC = session.read(0, session.num_samples)['behavior']
  assert np.isnan(behavior_TxC[:, neural.CHANNELS.index('running_speed')]).all()
  assert np.isfinite(behavior_TxC[:, neural.CHANNELS.index('pupil_size')]).any()
  edges = np.round(np.linspace(0, session.num_samples, 11)).astype(int)   # no trials table:
  assert session.trials['start'].tolist() == edges[:-1].tolist()          # 10 equal trials
  assert session.trials['stop'].tolist() == edges[1:].tolist()
  tiers = ['train'] * 4 + ['validation'] + ['train'] * 4 + ['test']
  assert session.trials['tier'].tolist() == tiers
  assert written['behavior'].keys() == {'pupil_position', 'pupil_area'}


def test_nwb_cli_error(tmp_path, rng, capsys):
  write_nwb(tmp_path / 'empty.nwb', rng, activity=None)
  assert nwb.main([str(tmp_path / 'empty.nwb'), str(tmp_path / 'store'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert err.count('brainscale:') == 1 and 'no units table' in err


def test_import_both_and_train_batch(mouse, tmp_path, rng):
  folder, _ = mouse
  write_nwb(tmp_path / 'calcium.nwb', rng)
  root = tmp_path / 'store'
  sensorium.import_sensorium(folder, root, progress=False)
  import_quietly(tmp_path / 'calcium.nwb', root)
  store = neural.Store(root)
  assert store.session_names == [folder.name, 'calcium'] and store.num_neurons == 12
  with pytest.raises(ValueError, match=r'expected frame_shape=\(6, 8\) \(--frame_shape 6,8\)'):
    nwb.import_nwb(tmp_path / 'calcium.nwb', root, session='big', frame_shape=(12, 16))
  ds = neural.pipeline(root, seed=1, batch_size=4, process_index=0, process_count=1, window=6,
                       stride=3, tiers=('train',), max_neurons=8, min_neurons=2)
  batch = next(iter(ds))
  assert batch['responses'].shape == (4, 6, 8) and batch['frames'].shape == (4, 6, H, W)
  assert batch['behavior'].shape == (4, 6, len(neural.CHANNELS))
  assert np.isfinite(batch['responses']).all() and batch['responses_mask'].any()
