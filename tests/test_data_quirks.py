"""Quirks of files written by other tools: NWB without tiers, behaviour where Allen keeps it,
damaged files, rotated phone video, and stores that lack what an experiment names.

NWB files are written with pynwb, videos with PyAV and the ffmpeg CLI (the CLI cases skip
where it is not installed, and fail instead under BRAINSCALE_REQUIRE_FFMPEG=1).
"""

import json
import os
import shutil
import subprocess

import av
import h5py
import numpy as np
import pytest
from pynwb.base import TimeSeries
from pynwb.behavior import BehavioralTimeSeries

from brainscale import config as config_lib
from brainscale.data import neural, video
from brainscale.data.importers import InputError, nwb, nwb_readers, videos
from brainscale.enigma import data as enigma_data
from brainscale.train import task as task_lib
from test_neural_importers import BEHAVIOR, H, W, import_quietly, interp, write_nwb

# 20 trials of 0.1 s inside the calcium recording (0.32 s to at least 3.4 s), shuffled
STARTS = 0.4 + 0.14 * np.random.default_rng(0).permutation(20)
UNTIERED = [(s, s + 0.1, None, k) for k, s in enumerate(STARTS)]


def held_out_by_position(starts) -> list[str]:
  """The documented rule: in time order, the 5th and 10th of every 10 trials are held out."""
  tiers = ['train'] * len(starts)
  for position, k in enumerate(np.argsort(starts)):
    tiers[k] = {4: 'validation', 9: 'test'}.get(position % 10, 'train')
  return tiers


# ---------------------------------------------------------------- NWB: tiers

def test_trials_without_tier_get_the_stated_split(tmp_path, rng, capsys):
  write_nwb(tmp_path / 'untiered.nwb', rng, trials=UNTIERED, tier_column=False)
  nwb.import_nwb(tmp_path / 'untiered.nwb', tmp_path / 'store', frame_shape=(H, W))
  out = capsys.readouterr().out
  assert '20 trials (train 16, validation 2, test 2)' in out
  assert 'no tier column, so the 5th and 10th of every 10 trials in time order' in out
  session = neural.Store(tmp_path / 'store').session('untiered')
  assert session.trials['tier'].tolist() == held_out_by_position(STARTS)
  assert session.trials['stimulus'].tolist() == list(range(20))


def enigma_config(root, *overrides):
  """enigma_tiny on a store of (H, W) frames, windows of 2 samples, small batches."""
  return config_lib.resolve('enigma_tiny', [
      f'--config.data.root={root}', f'--config.data.frame_shape=({H},{W})',
      '--config.data.window=2', '--config.data.stride=1', '--config.train.batch_size=2',
      '--config.train.eval_batches=1', '--config.data.workers=0', *overrides])


def test_untiered_nwb_trains_and_evaluates_on_its_held_out_trials(tmp_path, rng):
  write_nwb(tmp_path / 'untiered.nwb', rng, trials=UNTIERED, tier_column=False)
  import_quietly(tmp_path / 'untiered.nwb', tmp_path / 'store')
  task = task_lib.get_task(enigma_config(tmp_path / 'store', '--config.data.holdout=()'))
  assert next(task.train_data(0, 1))['responses'].shape[:2] == (2, 2)
  batch = task.eval_data(0, 1)[0]
  tiers = task.store.session('untiered').trials['tier']
  assert set(tiers[batch['trial']]) <= {'validation', 'test'}


def test_a_store_without_eval_tiers_fails_at_start_up(tmp_path, rng):
  train_only = [(s, stop, 'train', k) for s, stop, _, k in UNTIERED]
  write_nwb(tmp_path / 'train.nwb', rng, trials=train_only)
  import_quietly(tmp_path / 'train.nwb', tmp_path / 'store')
  task = task_lib.get_task(enigma_config(tmp_path / 'store', '--config.data.holdout=()'))
  with pytest.raises(config_lib.ConfigError) as error:
    task.train_data(0, 1)
  message = str(error.value)
  assert "data.eval_tiers=('validation', 'test'): no window of 2 samples" in message
  assert "{'train': 20}" in message and '\n' not in message


def test_a_holdout_naming_no_session_is_a_config_error(tmp_path, rng):
  write_nwb(tmp_path / 'untiered.nwb', rng, trials=UNTIERED, tier_column=False)
  import_quietly(tmp_path / 'untiered.nwb', tmp_path / 'store')
  task = task_lib.get_task(enigma_config(tmp_path / 'store', "--config.data.holdout=('a2s1',)"))
  with pytest.raises(config_lib.ConfigError, match=r"data.holdout=\('a2s1',\): 'a2s1' is not a "
                                                   r"session .* its sessions are \['untiered'\]"):
    task.train_data(0, 1)
  held = task_lib.get_task(enigma_config(tmp_path / 'store', "--config.data.holdout=('untiered',)"))
  with pytest.raises(config_lib.ConfigError, match=r"leave no session to train on; the store"):
    held.sessions()   # the only session held out


def test_the_simulated_populations_holdout_never_applies_to_a_store_of_yours(tmp_path, rng,
                                                                           capsys):
  """enigma_tiny keeps a2s1 of its own population out; on an imported store it trains on
  every session, and says so in one line."""
  write_nwb(tmp_path / 'untiered.nwb', rng, trials=UNTIERED, tier_column=False)
  import_quietly(tmp_path / 'untiered.nwb', tmp_path / 'store')
  task = task_lib.get_task(enigma_config(tmp_path / 'store'))
  assert task.config.data.synthetic.holdout == ('a2s1',) and task.sessions() == ['untiered']
  next(task.train_data(0, 1))
  assert (f'enigma: training on 1 sessions of store {tmp_path / "store"}; held out: none'
          in capsys.readouterr().out)
  synthetic = config_lib.resolve('enigma_tiny', [])
  assert enigma_data.held_out(synthetic) == ('a2s1',)
  assert enigma_data.held_out(config_lib.resolve('enigma_tiny_adapt', [])) == ()


def test_an_unknown_tier_in_the_file_names_the_trial(tmp_path, rng):
  rows = [(0.5, 1.5, 'train', 0), (1.5, 2.5, 'val', 1)]
  write_nwb(tmp_path / 'val.nwb', rng, trials=rows)
  with pytest.raises(InputError, match=r"trial 1 of .*val.nwb has tier 'val'; expected one of"):
    import_quietly(tmp_path / 'val.nwb', tmp_path / 'store')


# ---------------------------------------------------------------- NWB: behaviour

def series(name, data, rate=50.0):
  return TimeSeries(name=name, data=data, unit='cm/s', rate=rate, starting_time=0.0)


def running_places(rng):
  """{shape: (adds running speed to an nwbfile, (times, values) of the speed to find)}."""
  speed, other = rng.normal(size=220), rng.normal(size=(3, 220))
  times = np.arange(220) / 50.0

  def allen_visual_behavior(f):   # processing['running']: speed, speed_unfiltered; raw volts
    running = f.create_processing_module(name='running', description='wheel')
    running.add(series('speed_unfiltered', other[0]))
    running.add(series('speed', speed))
    f.add_acquisition(series('v_sig', other[1]))

  def allen_neuropixels(f):   # running_speed with its end times, the wheel's rotation, volts
    running = f.create_processing_module(name='running', description='wheel')
    running.add(series('running_speed_end_times', times + 0.02))
    running.add(series('running_wheel_rotation', other[0]))
    running.add(series('running_speed', speed))
    f.add_acquisition(series('running_wheel_signal_voltage', other[1]))
    f.add_acquisition(series('raw_running_wheel_rotation', other[2]))

  def behavior_module(f):   # a BehavioralTimeSeries beside the eye containers
    f.processing['behavior'].add(BehavioralTimeSeries(name='wheel', time_series=[
        series('raw_running_velocity', other[1]), series('running_velocity', speed)]))
    f.add_acquisition(series('running_speed_raw_counts', other[2]))

  def acquisition(f):
    f.add_acquisition(series('treadmill_speed', speed))

  shapes = {'allen_visual_behavior': allen_visual_behavior,
            'allen_neuropixels': allen_neuropixels, 'behavior_module': behavior_module,
            'acquisition': acquisition}
  return {k: (v, (times, speed)) for k, v in shapes.items()}


@pytest.mark.parametrize('shape', ['allen_visual_behavior', 'allen_neuropixels',
                                   'behavior_module', 'acquisition'])
def test_running_speed_is_found_where_files_keep_it(tmp_path, rng, shape):
  add, (times_S, speed_S) = running_places(rng)[shape]
  write_nwb(tmp_path / 'run.nwb', rng, behavior=BEHAVIOR[:2], trials=(), extra=add)
  import_quietly(tmp_path / 'run.nwb', tmp_path / 'store')
  session = neural.Store(tmp_path / 'store').session('run')
  data = session.read(0, session.num_samples)
  running_T = data['behavior'][:, neural.CHANNELS.index('running_speed')]
  np.testing.assert_allclose(running_T, interp(data['timestamps'], times_S, speed_S),
                             rtol=1e-4, atol=1e-4)


def test_missing_running_speed_lists_the_places_and_series(tmp_path, rng):
  def add(f):
    f.create_processing_module(name='running', description='wheel').add(
        series('running_wheel_rotation', rng.normal(size=50)))
  write_nwb(tmp_path / 'norun.nwb', rng, behavior=BEHAVIOR[:2], extra=add)
  with pytest.raises(InputError) as error:
    import_quietly(tmp_path / 'norun.nwb', tmp_path / 'store')
  message = str(error.value)
  assert "no running_speed in " in message and "processing['running']" in message
  assert "processing['running']/running_wheel_rotation" in message   # found, not speed


# ---------------------------------------------------------------- damaged files

def _truncated(path):
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 3 // 5])


def _not_nwb(path):
  path.unlink()
  with h5py.File(path, 'w') as f:
    f['x'] = np.arange(3)


DAMAGE = {'truncated': _truncated, 'empty': lambda p: p.write_bytes(b''),
          'text': lambda p: p.write_text('not HDF5'), 'hdf5, not NWB': _not_nwb}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_nwb_file_is_a_one_line_error_naming_it(tmp_path, rng, capsys, damage):
  path = tmp_path / 'damaged.nwb'
  write_nwb(path, rng)
  DAMAGE[damage](path)
  with pytest.raises(InputError, match=f'{path} is not a readable NWB file'):
    import_quietly(path, tmp_path / 'store')
  assert nwb.main([str(path), str(tmp_path / 'store'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'brainscale: {path} is not a readable NWB file') and err.count('\n') == 1
  assert not (tmp_path / 'store').exists()


def test_a_damaged_movie_is_a_one_line_error_naming_it(tmp_path, rng, capsys):
  write_nwb(tmp_path / 'ext.nwb', rng, stimulus='external')
  (tmp_path / 'movie.mp4').write_bytes(b'\x00\x00\x00\x18ftypmp42' + bytes(300))
  assert nwb.main([str(tmp_path / 'ext.nwb'), str(tmp_path / 'store'), '--quiet',
                   '--frame_shape', f'{H},{W}']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'brainscale: movie {tmp_path / "movie.mp4"} cannot be decoded')
  assert err.count('\n') == 1


def test_a_bug_is_not_reported_as_bad_input(tmp_path, rng, monkeypatch):
  write_nwb(tmp_path / 'ok.nwb', rng)
  monkeypatch.setattr(nwb, '_trial_summary', lambda *_: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    nwb.main([str(tmp_path / 'ok.nwb'), str(tmp_path / 'store'), '--quiet'])


# ---------------------------------------------------------------- rotated video

SIDE = 16   # marker blocks: one macroblock each


def marked(height=32, width=64) -> np.ndarray:
  """A non-square RGB frame: gray, a bright block top left, a dim one top right."""
  image = np.full((height, width, 3), 60, np.uint8)
  image[:SIDE, :SIDE], image[:SIDE, -SIDE:] = 230, 140
  return image


def write_marked(path, frames=12, *, rotation=None, hflip=False):
  """An H.264 mp4 of marked() frames; rotation: a display matrix (PyAV's, counter-clockwise)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=10)
    stream.height, stream.width = marked().shape[:2]
    stream.pix_fmt = 'yuv420p'
    if rotation is not None:
      stream.set_display_rotation(rotation, hflip=hflip)
    for _ in range(frames):
      container.mux(stream.encode(av.VideoFrame.from_ndarray(marked(), format='rgb24')))
    container.mux(stream.encode(None))
  return path


def ffmpeg_cli() -> str:
  """The ffmpeg command; skips without one (fails under BRAINSCALE_REQUIRE_FFMPEG=1)."""
  found = shutil.which('ffmpeg')
  if found is None and os.environ.get('BRAINSCALE_REQUIRE_FFMPEG') == '1':
    pytest.fail('no ffmpeg CLI on PATH (BRAINSCALE_REQUIRE_FFMPEG=1)')
  if found is None:
    pytest.skip('no ffmpeg CLI on PATH')
  return found


def rotate_with_cli(ffmpeg, source, out, degrees: int):
  """The clip with a rotation as the ffmpeg CLI writes it (stream copy): -display_rotation
  where the CLI has it (FFmpeg >= 6), else the 'rotate' stream metadata of older ones."""
  options = subprocess.run([ffmpeg, '-hide_banner', '-h', 'full'], capture_output=True,
                           text=True).stdout
  if 'display_rotation' in options:
    args = ['-display_rotation', str(degrees), '-i', str(source)]
  else:
    args = ['-i', str(source), '-metadata:s:v', f'rotate={degrees}']
  subprocess.run([ffmpeg, '-v', 'error', '-y', *args, '-c', 'copy', str(out)], check=True)


def shown_by_cli(ffmpeg, path, shape) -> np.ndarray:
  """The first frame as the ffmpeg CLI shows it (autorotate), RGB of the given shape."""
  raw = subprocess.run([ffmpeg, '-v', 'error', '-i', str(path), '-frames:v', '1', '-f',
                        'rawvideo', '-pix_fmt', 'rgb24', '-'], capture_output=True,
                       check=True).stdout
  return np.frombuffer(raw, np.uint8).reshape(shape)


def import_one(path, out) -> tuple[dict, dict, np.ndarray]:
  """(report entry, index entry, first frame) of a folder holding only this video."""
  report = videos.import_videos(path.parent, out, max_side=0, progress=False)
  clip = json.loads((out / 'index.json').read_text())['clips'][0]
  record = video.ClipSource(out)[0]
  first = video.decode_frames(video.decode_record(record)[1], [0])[0]
  return report.imported[0], clip, first


def assert_close(frame, expected):
  assert frame.shape == expected.shape
  assert np.abs(frame.astype(int) - expected).mean() < 4   # H.264 of flat blocks


@pytest.mark.parametrize('rotation, hflip', [(90, False), (180, False), (270, True)])
def test_a_display_matrix_is_applied_on_import_and_decode(tmp_path, rotation, hflip):
  path = write_marked(tmp_path / 'src' / 'phone.mp4', rotation=rotation, hflip=hflip)
  expected = np.rot90(marked(), rotation // 90)
  expected = np.ascontiguousarray(expected[:, ::-1] if hflip else expected)
  assert_close(video.decode_frames(path.read_bytes(), [0])[0], expected)
  entry, clip, first = import_one(path, tmp_path / 'out')
  assert (clip['height'], clip['width']) == expected.shape[:2]
  assert entry['display'] == (f'rotated {rotation}° counter-clockwise'
                              + (', then mirrored left-right' if hflip else ''))
  assert_close(first, expected)


@pytest.mark.parametrize('degrees', [90, 270])
def test_a_clip_rotated_by_the_ffmpeg_cli_is_imported_as_ffmpeg_shows_it(tmp_path, degrees):
  ffmpeg = ffmpeg_cli()
  (tmp_path / 'src').mkdir()
  rotate_with_cli(ffmpeg, write_marked(tmp_path / 'plain.mp4'), tmp_path / 'src' / 'phone.mp4',
                  degrees)
  shown = shown_by_cli(ffmpeg, tmp_path / 'src' / 'phone.mp4', (64, 32, 3))   # portrait
  assert_close(np.rot90(marked(), degrees // 90), shown)   # the CLI turns it counter-clockwise
  _, clip, first = import_one(tmp_path / 'src' / 'phone.mp4', tmp_path / 'out')
  assert (clip['height'], clip['width']) == (64, 32)
  assert_close(first, shown)


def test_a_rotated_stimulus_movie_is_read_upright(tmp_path, rng):
  write_nwb(tmp_path / 'ext.nwb', rng, stimulus='external')   # 30 frame times
  write_marked(tmp_path / 'movie.mp4', frames=30, rotation=90)
  import_quietly(tmp_path / 'ext.nwb', tmp_path / 'store')
  frames = neural.Store(tmp_path / 'store').session('ext').array('frames').read().result()
  luma = marked()[..., 0].astype(float)
  shown = np.rot90(luma)   # 64 x 32: resized to H x W as the importer does
  rows = (nwb_readers._resize_matrix(shown.shape[0], H) @ shown
          @ nwb_readers._resize_matrix(shown.shape[1], W).T)
  assert frames.shape == (30, H, W)
  assert np.abs(frames.astype(float) - rows).max() < 6
