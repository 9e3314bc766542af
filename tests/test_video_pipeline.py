"""The Grain clip pipeline over imported videos (shapes, frame gaps, process split, exact
resume, workers, broken records) and the ground-truth flow cropped and scaled with the frames.
"""

import json

import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter

from brainscale.data import video
from conftest import assert_batches_equal, assert_resume_is_exact, assert_workers_match, take
from video_helpers import gray, import_quietly, index_of, write_video

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()   # Grain reads absl flags


@pytest.fixture(scope='module')
def ids(tmp_path_factory):
  """Eight one-clip videos; video v is the flat gray level 16 + 24 v throughout."""
  root = tmp_path_factory.mktemp('ids')
  for v in range(8):
    draw = lambda i, width, height, v=v: np.full((height, width, 3), 16 + 24 * v, np.uint8)
    write_video(root / f'v{v}.mp4', 'libx264', 48, 48, 10, 8, draw=draw)
  out = root.parent / (root.name + '-imported')
  import_quietly(root, out, clip_seconds=1.0, max_side=0)
  return out


def video_ids(batch_frames: np.ndarray) -> list[int]:
  return list(np.round((batch_frames.reshape(len(batch_frames), -1).mean(1) - 16) / 24).astype(int))


# ---------------------------------------------------------------- pipeline

def make(directory, **kwargs):
  settings = dict(seed=0, batch_size=2, process_index=0, process_count=1, size=16)
  return video.pipeline(directory, **{**settings, **kwargs})


def test_pipeline_shapes_and_dtypes(imported):
  out, _ = imported
  batch = next(iter(make(out, batch_size=4, size=24, frames=3)))
  assert set(batch) == {'frames', 'skipped'}
  assert batch['frames'].shape == (4, 3, 24, 24, 3) and batch['frames'].dtype == np.uint8
  assert batch['skipped'].shape == (4,) and batch['skipped'].dtype == np.int32
  eval_batch = next(iter(make(out, batch_size=4, size=24, train=False, process_count=2)))
  assert eval_batch['frames'].shape == (2, 2, 24, 24, 3)
  with pytest.raises(ValueError, match='batch_size=3 does not split over 2 processes'):
    make(out, batch_size=3, process_count=2)


@pytest.mark.parametrize('fps,gap_ms,gap', [(10, 150.0, 2), (24, 150.0, 4), (30, 150.0, 5),
                                            (30, 20.0, 1)])
def test_frames_of_an_example_are_gap_apart(tmp_path, fps, gap_ms, gap):
  # resizing moves flat levels by a few steps of 1: frame i is level 16 + 8 i here
  draw = lambda i, width, height: gray(i, width, height, step=8)
  write_video(tmp_path / 'src' / 'ramp.mp4', 'libx264', 40, 30, fps, 30, draw=draw)
  import_quietly(tmp_path / 'src', tmp_path / 'out', clip_seconds=10.0)
  starts = set()
  ds = make(tmp_path / 'out', batch_size=8, frames=3, gap_ms=gap_ms, seed=round(fps))
  for batch in take(iter(ds), 3):
    for frames_FxHxWx3 in batch['frames']:
      i = index_of(frames_FxHxWx3, step=8)
      assert list(np.diff(i)) == [gap, gap] and 0 <= i[0] and i[-1] < 30, i
      starts.add(i[0])
  assert len(starts) > 5   # starts are drawn, not fixed


def test_processes_take_disjoint_examples_that_interleave_to_the_single_process_stream(ids):
  whole = list(make(ids, batch_size=2, num_epochs=1))
  parts = [list(make(ids, batch_size=2, process_index=p, process_count=2, num_epochs=1))
           for p in range(2)]
  assert len(whole) == 4 and len(parts[0]) == len(parts[1]) == 4
  seen = [sum((video_ids(b['frames']) for b in part), []) for part in parts]
  assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(8))
  for batch, b0, b1 in zip(whole, *parts):
    np.testing.assert_array_equal(batch['frames'][0::2], b0['frames'])
    np.testing.assert_array_equal(batch['frames'][1::2], b1['frames'])


def test_resume_mid_epoch_is_exact(imported):
  out, _ = imported
  assert_resume_is_exact(lambda: iter(make(out, seed=3)), 2, 3)


def test_resume_across_an_epoch_boundary_is_exact_and_epochs_reshuffle(ids):
  it = iter(make(ids, seed=5))   # 8 clips: 4 batches per epoch
  first = take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  resumed = iter(make(ids, seed=5))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)
  epochs = [sum((video_ids(b['frames']) for b in batches), [])
            for batches in (first + expected[:1], expected[1:] + take(it, 1))]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and epochs[0] != epochs[1]


def test_worker_processes_give_the_same_batches_and_resume(ids):
  assert_workers_match(lambda: iter(make(ids, seed=7)),
                       lambda: iter(make(ids, seed=7, workers=1)), 3)


def write_folder(directory, records):
  """An imported-video folder made by hand: one shard holding these records."""
  directory.mkdir()
  writer = ArrayRecordWriter(str(directory / 'shard-00000-of-00001.array_record'), 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()
  index = {'clips': [{'shard': 0} for _ in records],
           'shards': [{'name': 'shard-00000-of-00001.array_record', 'records': len(records)}]}
  (directory / 'index.json').write_text(json.dumps(index))


def test_a_record_that_fails_to_decode_is_replaced_and_counted(ids, tmp_path):
  good = [video.ClipSource(ids)[k] for k in range(3)]
  header = video.decode_header(good[0])
  broken = video.encode_record({**header, 'clip': 99}, b'\x00\x00\x01 not h264 at all')
  write_folder(tmp_path / 'mixed', good[:2] + [broken] + good[2:])
  (batch,) = list(make(tmp_path / 'mixed', batch_size=4, train=False, frames=1, num_epochs=1))
  assert list(batch['skipped']) == [0, 0, 1, 0]
  assert video_ids(batch['frames'])[2] in video_ids(batch['frames'][[0, 1, 3]])
  write_folder(tmp_path / 'broken', [broken, b'BSV1 garbage'])
  with pytest.raises(RuntimeError, match='records in a row failed to decode'):
    next(iter(make(tmp_path / 'broken', batch_size=1)))


# ---------------------------------------------------------------- ground-truth flow

def test_resize_flow_rescales_grid_and_values():
  flow_64x96x2 = np.zeros((64, 96, 2), np.float32)
  flow_64x96x2[..., 0], flow_64x96x2[..., 1] = np.arange(96), 3.0   # dx = column, dy = 3
  half = video.resize_flow(flow_64x96x2, 32, 48)   # column j samples x = 2 j + 0.5; values halve
  np.testing.assert_allclose(half[..., 0], np.broadcast_to(np.arange(48) + 0.25, (32, 48)),
                             atol=1e-5)
  np.testing.assert_allclose(half[..., 1], 1.5)
  double = video.resize_flow(flow_64x96x2, 128, 192)   # column j samples x = j / 2 - 0.25
  np.testing.assert_allclose(double[:, 1:-1, 0],
                             np.broadcast_to(np.arange(1, 191) - 0.5, (128, 190)), atol=1e-5)
  np.testing.assert_allclose(double[..., 1], 6.0)


@pytest.fixture(scope='module')
def flow_clips(tmp_path_factory):
  """96x64 at 20 fps: a still gray texture; flow (dx, dy) = (random field, -1) over 3 frames."""
  root = tmp_path_factory.mktemp('flow')
  rng = np.random.default_rng(5)
  texture_64x96x3 = rng.integers(0, 256, (16, 24, 1), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
  texture = lambda i, width, height: texture_64x96x3.repeat(3, 2)
  write_video(root / 'src' / 'still.mp4', 'libx264', 96, 64, 20, 20, draw=texture)
  flow_Tx64x96x2 = np.zeros((20 - 3, 64, 96, 2), np.float16)
  flow_Tx64x96x2[..., 0], flow_Tx64x96x2[..., 1] = rng.normal(0, 4, (64, 96)), -1
  np.save(root / 'src' / 'still.flow.npy', flow_Tx64x96x2)
  (root / 'src' / 'still.json').write_text(json.dumps({'flow_gap_frames': 3}))
  import_quietly(root / 'src', root / 'out', max_side=32)
  return root / 'out', flow_Tx64x96x2[0].astype(np.float32)


def test_flow_sidecar_is_stored_resized(flow_clips):
  out, flow_64x96x2 = flow_clips
  source = video.ClipSource(out)
  header, _, arrays = video.decode_record(source[0])
  assert source.index['clips'][0]['has_flow'] and header['flow_gap_frames'] == 3
  assert arrays['flow'].shape == (17, 32, 48, 2) and arrays['flow'].dtype == np.float16
  np.testing.assert_array_equal(arrays['flow'][..., 1], -0.5)
  expected = video.resize_flow(flow_64x96x2, 32, 48).astype(np.float16)
  np.testing.assert_array_equal(arrays['flow'], np.broadcast_to(expected, (17, 32, 48, 2)))


def best_crop(frame_SxSx3, frame_HxWx3):
  """(mean abs difference, y0, x0) of the crop of frame_HxWx3 nearest to frame_SxSx3."""
  s, (h, w) = len(frame_SxSx3), frame_HxWx3.shape[:2]
  a, b = frame_SxSx3.astype(np.float32), frame_HxWx3.astype(np.float32)
  return min((np.abs(a - b[y:y + s, x:x + s]).mean(), y, x) for y in range(h - s + 1)
             for x in range(w - s + 1))


@pytest.mark.parametrize('train', [False, True])
def test_flow_is_cropped_and_scaled_like_the_frames(flow_clips, train):
  out, _ = flow_clips
  batch = next(iter(make(out, batch_size=6, size=24, gap_ms=150.0, with_flow=True, train=train,
                         scale=(1.0, 1.5))))
  flow_Bx24x24x2, frames_Bx2x24x24x3 = batch['flow'], batch['frames']
  assert flow_Bx24x24x2.shape == (6, 24, 24, 2) and flow_Bx24x24x2.dtype == np.float32
  _, data, arrays = video.decode_record(video.ClipSource(out)[0])   # a still: any frame will do
  for flow_24x24x2, frame_24x24x3 in zip(flow_Bx24x24x2, frames_Bx2x24x24x3[:, 0]):
    height = round(-flow_24x24x2[0, 0, 1] / 0.5 * 32)   # stored dy = -0.5 on a 48x32 grid
    np.testing.assert_array_equal(flow_24x24x2[..., 1], -0.5 * height / 32)
    # find the frame's size (aspect 3:2 up to rounding) and crop by search; the flow must match
    candidates = []
    for w in range(height * 3 // 2 - 1, height * 3 // 2 + 2):
      resized_HxWx3 = video.decode_frames(data, [0], width=w, height=height)[0]
      candidates.append(best_crop(frame_24x24x3, resized_HxWx3) + (w,))
    error, y0, x0, width = min(candidates)
    assert error < 4, error
    if not train:
      assert (height, width, y0, x0) == (24, 36, 0, 6)
    expected = video.resize_flow(arrays['flow'][0], height, width)[y0:y0 + 24, x0:x0 + 24]
    np.testing.assert_allclose(flow_24x24x2, expected, atol=1e-6)


def test_flow_needs_the_gap_it_was_made_for(flow_clips, ids):
  out, _ = flow_clips
  with pytest.raises(ValueError, match=r'gap_ms=100.0 at 20 fps is a gap of 2 frames.*spans 3'):
    next(iter(make(out, gap_ms=100.0, with_flow=True)))
  with pytest.raises(ValueError, match='with_flow=True needs frames=2'):
    make(out, frames=3, with_flow=True)
  with pytest.raises(ValueError, match='no ground-truth flow'):
    next(iter(make(ids, with_flow=True)))
