"""launch/predict.py and brainscale.cwm.predict: counterfactual predictions on a video or two
images of one's own, from a tiny CWM checkpoint (initialised, not trained: the tests check
the plumbing, not the predictions)."""

import subprocess
import sys
from inspect import signature

import av
import numpy as np
import pytest
from matplotlib import image as mpimg

from brainscale import config as config_lib
from brainscale import inspect
from brainscale.cwm import counterfactual, predict
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from conftest import ROOT
from test_data_quirks import ffmpeg_cli
from test_train import cli_env

TINY = ['--config.model.layers=1', '--config.model.dim=32', '--config.model.heads=2',
        '--config.model.head_dim=16', '--config.model.mlp_hidden=64',
        '--config.tokenizer.model.channels=16', '--config.tokenizer.experiment=']
SIZE, PATCH, GRID = 48, 8, 6      # cwm_tiny's frames, patches and patches per side


def save_initialised(workdir, experiment: str, overrides: list[str]):
  """A checkpoint of step 0 of the experiment's freshly initialised state."""
  config = config_lib.resolve(experiment, overrides)
  setup = step_lib.build(config)
  checkpoints = Checkpoints(str(workdir), keep=1, async_save=False)
  checkpoints.save(0, step_lib.init_state(setup), None, config)
  checkpoints.close()
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return save_initialised(tmp_path_factory.mktemp('predict') / 'cwm', 'cwm_tiny', TINY)


@pytest.fixture(scope='module')
def model(workdir):
  return inspect.load(workdir).model


def square_frames(count: int = 10) -> np.ndarray:
  """[count, 48, 64, 3] uint8: a white square 4 pixels further right in each frame."""
  frames = np.zeros((count, SIZE, 64, 3), np.uint8)
  frames[..., 2] = 60
  for i in range(count):
    frames[i, 16:28, 4 + 4 * i:16 + 4 * i] = 255
  return frames


def write_clip(path, frames_FxHxWx3: np.ndarray, fps: int = 10):
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=fps, options={'qp': '0'})
    stream.height, stream.width = frames_FxHxWx3.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    for frame in frames_FxHxWx3:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode(None))
  return path


def predict_cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'launch/predict.py', *args], cwd=ROOT, env=cli_env(1),
                        capture_output=True, text=True, timeout=300)


def hidden_reference(revealed) -> np.ndarray:
  """[48, 48] True on the pixels of the patches not revealed."""
  shown = np.zeros(GRID * GRID, bool)
  shown[np.asarray(revealed)] = True
  return np.kron(~shown.reshape(GRID, GRID), np.ones((PATCH, PATCH), bool))


@pytest.mark.slow
def test_cli_on_a_clip_of_the_ffmpeg_cli_writes_the_panel_and_the_arrays(workdir, model,
                                                                         tmp_path):
  ffmpeg = ffmpeg_cli()
  clip, out = tmp_path / 'clip.mp4', tmp_path / 'out'
  subprocess.run([ffmpeg, '-v', 'error', '-f', 'lavfi', '-i', 'testsrc=size=96x64:rate=10',
                  '-t', '1', '-pix_fmt', 'yuv420p', str(clip)], check=True)
  done = predict_cli(f'--workdir={workdir}', f'--video={clip}', '--move=4,4:40,44',
                     '--points=10,10;30,20;47.5,0', '--orders=2', f'--out={out}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines() == [f'wrote {out / "prediction.npz"}',
                                      f'wrote {out / "panel.png"}']
  a = np.load(out / 'prediction.npz')
  # cwm_tiny's gap_ms=167 is 2 frames at 10 fps: frames 0 and 2, as the library reads them
  expected = predict.video_frames(clip, model.layout, gap_ms=167.0)
  np.testing.assert_array_equal(np.stack([a['frame0'], a['frame1']]), expected)
  assert not np.array_equal(a['frame0'], a['frame1'])
  for name in ('prediction', 'moved'):
    assert a[name].shape == (SIZE, SIZE, 3) and a[name].dtype == np.float32
    assert 0 <= a[name].min() and a[name].max() <= 1
  assert a['hidden'].shape == (SIZE, SIZE) and a['codes'].shape == (12, 12)
  np.testing.assert_array_equal(a['hidden'], hidden_reference(a['revealed']))
  np.testing.assert_array_equal(a['move_patches'], [0, 5 * GRID + 5])
  np.testing.assert_array_equal(a['points'], [[10, 10], [30, 20], [47.5, 0]])
  assert a['flow'].shape == (3, 2) and np.isfinite(a['flow']).all()
  assert a['kl'].shape == (3, 12, 12) and a['kl'].min() > -1e-4
  panel = mpimg.imread(out / 'panel.png')
  assert panel.ndim == 3 and panel.shape[1] > 3 * panel.shape[0]   # four panels in a row
  assert panel[..., :3].std() > 0.05


@pytest.mark.slow
def test_a_pyav_clip_and_two_pngs_through_the_library(model, tmp_path, seed):
  source = square_frames()
  clip = write_clip(tmp_path / 'squares.mp4', source)
  # 64x48 needs no resize: the crop is columns 8..55. 300 ms at 10 fps is 3 frames.
  frames = predict.video_frames(clip, model.layout, gap_ms=300.0, start_s=0.2)
  assert frames.shape == (2, SIZE, SIZE, 3) and frames.dtype == np.uint8
  error_2xF = np.abs(frames[:, None].astype(int) - source[None, :, :, 8:56]).mean((2, 3, 4))
  np.testing.assert_array_equal(error_2xF.argmin(1), [2, 5])
  assert error_2xF.min(1).max() < 4

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (2, 6, 8, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
  paths = [tmp_path / 'a.png', tmp_path / 'b.png']
  for path, image in zip(paths, images):
    mpimg.imsave(path, image)
  pair = predict.image_frames(paths, model.layout)
  np.testing.assert_array_equal(pair, images[:, :, 8:56])

  move = np.array([[12, 20], [30, 20]], np.float32)          # patch 13 -> patch 15
  result = predict.predict(model, pair, reveal=0.25, move_2x2=move, points_Kx2=move[:1],
                           decode='argmax', orders=2, seed=seed)
  revealed = result['revealed']
  assert len(revealed) == 9 and len(set(revealed)) == 9 and 15 not in revealed
  np.testing.assert_array_equal(result['move_patches'], [13, 15])
  np.testing.assert_array_equal(result['hidden'], hidden_reference(revealed))
  np.testing.assert_array_equal(result['moved_hidden'],
                                hidden_reference(np.append(revealed, 15)))
  assert result['flow'].shape == (1, 2) and result['kl'].shape == (1, 12, 12)
  again = predict.predict(model, pair, reveal=0.25, move_2x2=move, decode='argmax', seed=seed)
  np.testing.assert_array_equal(again['prediction'], result['prediction'])
  other = predict.predict(model, pair, reveal=0.25, decode='argmax', seed=seed + 1)
  assert not np.array_equal(other['revealed'], revealed)
  written = predict.write(result, tmp_path / 'out')
  assert [p.name for p in written] == ['prediction.npz', 'panel.png']
  assert mpimg.imread(written[1]).shape[1] > 3 * mpimg.imread(written[1]).shape[0]


@pytest.mark.slow
@pytest.mark.skipif('temperature' not in signature(counterfactual.predict_codes).parameters,
                    reason='predict_codes takes no sampling options yet')
def test_sampling_options_reach_the_probe(model, rng, seed):
  pair = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  image = lambda **kw: predict.predict(model, pair, seed=seed, **kw)['prediction']
  argmax = image(decode='argmax')
  np.testing.assert_array_equal(image(decode='sample', temperature=0.0), argmax)
  np.testing.assert_array_equal(image(decode='sample', top_k=1), argmax)
  assert not np.array_equal(image(decode='sample', top_k=3), argmax)


@pytest.mark.slow
@pytest.mark.parametrize('case', ['missing file', 'corrupt file', 'point outside',
                                  'malformed move', 'no checkpoint', 'another model'])
def test_a_bad_input_is_one_line_and_exit_2(workdir, tmp_path, rng, case):
  clip = write_clip(tmp_path / 'clip.mp4', square_frames(4))
  (tmp_path / 'noise.mp4').write_bytes(rng.bytes(4000))
  args, named = {
      'missing file': ([f'--video={tmp_path / "absent.mp4"}'], 'absent.mp4'),
      'corrupt file': ([f'--video={tmp_path / "noise.mp4"}'], 'noise.mp4'),
      'point outside': ([f'--video={clip}', '--points=10,10;60,5'], '(60, 5)'),
      'malformed move': ([f'--video={clip}', '--move=10,20-30,20'], '10,20-30,20'),
      'no checkpoint': ([f'--video={clip}', f'--workdir={tmp_path}'], str(tmp_path)),
      'another model': ([f'--video={clip}', f'--workdir={tmp_path / "smoke"}'],
                        'experiment smoke); predictions need a CWM world model'),
  }[case]
  if case == 'another model':
    save_initialised(tmp_path / 'smoke', 'smoke', [])
  done = predict_cli(f'--workdir={workdir}', *args, f'--out={tmp_path / "out"}')
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('brainscale: '), done.stderr
  assert named in lines[0]
  if case == 'point outside':
    assert '48x48' in lines[0]
  assert not (tmp_path / 'out').exists()
