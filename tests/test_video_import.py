"""Video import (folder → shards), index and records, and exact frame decoding.

Test videos are written with PyAV; frame i of most is a flat gray level
16 + 4 i, so a decoded frame tells its index whatever the resize and crop.
"""

import io
import json
import math

import av
import numpy as np
import pytest

from brainscale.data import video
from brainscale.data.importers import videos as importer
from video_helpers import (
  CLIPS,
  VIDEOS,
  import_quietly,
  index_of,
  write_video,
)

# ---------------------------------------------------------------- import

def test_import_keeps_every_valid_video_and_reports_the_rest(imported):
  out, report = imported
  by_path = {v['path']: v for v in report.imported}
  assert {p: by_path[p]['clips'] for p in CLIPS} == CLIPS
  assert 'dropped the last 2 frames' in by_path['sub/c.mkv']['note']
  partial = by_path['cutfast.mp4']
  assert 0 < partial['frames'] < 60 and 'decoding stopped' in partial['note']
  reasons = {s['path']: s['reason'] for s in report.skipped}
  assert sorted(reasons) == ['cut.mp4', 'empty.avi', 'random.webm', 'text.mp4']
  assert 'moov atom not found' in reasons['cut.mp4']
  assert reasons['empty.avi'] == 'ValueError: empty file'
  assert all(r and '\n' not in r for r in reasons.values())
  assert report.ignored_files == 1
  assert '7 videos' in report.summary() and '4 files' in report.summary()
  assert json.loads((out / 'report.json').read_text()) == json.loads(json.dumps(
      {'imported': report.imported, 'skipped': report.skipped, 'ignored_files': 1}))


def test_index_lists_every_clip_in_order(imported):
  out, report = imported
  index = json.loads((out / 'index.json').read_text())
  clips = index['clips']
  assert index['videos'] == 7 and len(clips) == sum(v['clips'] for v in report.imported) == 11
  order = [(c['source'], c['clip']) for c in clips]
  assert order == sorted(order)
  assert [s['records'] for s in index['shards']] == [4, 4, 3]
  assert sorted(p.name for p in out.glob('shard-*')) == [s['name'] for s in index['shards']]
  assert [c['shard'] for c in clips] == [0] * 4 + [1] * 4 + [2] * 3
  source = video.ClipSource(out)
  for k, clip in enumerate(clips):
    header = video.decode_header(source[k])
    assert {key: header[key] for key in ('source', 'clip', 'frames', 'width', 'height')} == {
        key: clip[key] for key in ('source', 'clip', 'frames', 'width', 'height')}
    fps = VIDEOS[clip['source']][3] if clip['source'] in VIDEOS else 30
    per_clip = math.floor(fps)   # clip_seconds=1
    assert clip['fps'] == pytest.approx(float(fps))
    assert clip['duration_s'] == pytest.approx(clip['frames'] / fps)
    assert clip['start_s'] == pytest.approx(clip['clip'] * per_clip / fps)
    assert clip['frames'] <= per_clip and not clip['has_flow']


def test_long_video_is_split_into_clips_of_consecutive_frames(imported):
  out, _ = imported
  source = video.ClipSource(out)
  firsts = []
  for k, clip in enumerate(source.index['clips']):
    if clip['source'] == 'a.mp4':
      header, data, _ = video.decode_record(source[k])
      frames = video.decode_frames(data, list(range(header['frames'])))
      firsts.append(index_of(frames)[0])
      np.testing.assert_array_equal(np.diff(index_of(frames)), 1)
  assert firsts == [0, 30]


def test_resize_keeps_aspect_with_short_side_at_most_max_side(imported):
  _, report = imported
  for v in report.imported:
    w, h = v['width'], v['height']
    assert min(w, h) == 32 and w % 2 == 0 and h % 2 == 0
    assert abs(w / h - v['source_width'] / v['source_height']) < 2 / min(w, h)


def test_max_side_zero_keeps_the_size_made_even(tmp_path):
  write_video(tmp_path / 'src' / 'odd.webm', 'libvpx-vp9', 65, 49, 10, 5)
  report = import_quietly(tmp_path / 'src', tmp_path / 'out', max_side=0)
  (v,) = report.imported
  assert (v['source_width'], v['source_height']) == (65, 49)
  assert v['width'] % 2 == v['height'] % 2 == 0
  assert abs(v['width'] - 65) <= 1 and abs(v['height'] - 49) <= 1


def test_two_workers_write_byte_identical_shards(sources, imported, tmp_path):
  out, _ = imported
  import_quietly(sources, tmp_path / 'clips', clip_seconds=1.0, max_side=32, records_per_shard=4,
                 workers=2)
  for name in ['index.json', 'report.json'] + [p.name for p in out.glob('shard-*')]:
    assert (tmp_path / 'clips' / name).read_bytes() == (out / name).read_bytes(), name
  assert sorted(p.name for p in tmp_path.iterdir()) == ['clips']   # no staging left behind


def test_existing_import_is_an_error_unless_overwrite(tmp_path, capsys):
  write_video(tmp_path / 'src' / 'x.mp4', 'libx264', 32, 32, 10, 4)
  assert importer.main([str(tmp_path / 'src'), str(tmp_path / 'out'), '--quiet']) == 0
  assert 'imported 1 videos as 1 clips' in capsys.readouterr().out
  assert importer.main([str(tmp_path / 'src'), str(tmp_path / 'out'), '--quiet']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('brainscale: ') and 'already holds' in err
  with pytest.raises(ValueError, match='overwrite=True'):
    import_quietly(tmp_path / 'src', tmp_path / 'out')
  report = import_quietly(tmp_path / 'src', tmp_path / 'out', overwrite=True, clip_seconds=0.2)
  assert report.imported[0]['clips'] == 2
  assert len(video.ClipSource(tmp_path / 'out')) == 2
  with pytest.raises(FileNotFoundError, match='not an imported video folder'):
    video.ClipSource(tmp_path / 'src')


def test_a_folder_without_readable_video_is_an_error(tmp_path):
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'bad.mp4').write_text('nope')
  with pytest.raises(ValueError, match='no readable video'):
    import_quietly(tmp_path / 'src', tmp_path / 'out')
  assert not (tmp_path / 'out').exists() and list(tmp_path.iterdir()) == [tmp_path / 'src']


# ---------------------------------------------------------------- records

def test_record_round_trip_with_arrays():
  rng = np.random.default_rng()
  flow = rng.normal(size=(3, 4, 5, 2)).astype(np.float16)
  big_endian = rng.integers(-9, 9, 7).astype('>i4')
  payload = rng.bytes(int(rng.integers(0, 500)))
  header = {'source': 'x/ü.mp4', 'clip': 3, 'fps': 29.97}
  record = video.encode_record(header, payload, {'flow': flow, 'ids': big_endian})
  assert record[:4] == b'BSV1'
  got, data, arrays = video.decode_record(record)
  assert data == payload and {k: got[k] for k in header} == header
  assert got['video_bytes'] == len(payload)
  assert [a['name'] for a in got['arrays']] == ['flow', 'ids']
  np.testing.assert_array_equal(arrays['flow'], flow)
  np.testing.assert_array_equal(arrays['ids'], big_endian)
  assert arrays['flow'].dtype == np.float16 and arrays['ids'].dtype == np.dtype('<i4')
  assert video.decode_record(video.encode_record(header, payload))[2] == {}


def test_bad_records_are_one_line_errors():
  record = video.encode_record({'clip': 0}, b'video', {'a': np.arange(10)})
  with pytest.raises(ValueError, match="expected b'BSV1'"):
    video.decode_record(b'XXXX' + record[4:])
  for cut in [6, 12, len(record) - 1]:
    with pytest.raises(ValueError, match='truncated') as error:
      video.decode_record(record[:cut])
    assert '\n' not in str(error.value)


# ---------------------------------------------------------------- decoding

def test_decode_frames_returns_exactly_the_requested_frames(imported):
  out, _ = imported
  source = video.ClipSource(out)
  k = next(k for k, c in enumerate(source.index['clips']) if c['source'] == 'noise.mp4')
  header, data, _ = video.decode_record(source[k])
  with av.open(io.BytesIO(data)) as container:
    all_frames = list(container.decode(video=0))
  full_NxHxWx3 = np.stack([f.to_ndarray(format='rgb24') for f in all_frames])
  assert len(full_NxHxWx3) == header['frames'] == 29 and header['fps_rational'] == '30000/1001'
  assert [i for i, f in enumerate(all_frames) if f.key_frame] == [0, 8, 16, 24]   # gop 8
  rng = np.random.default_rng()
  for _ in range(20):
    wanted = list(rng.integers(0, 29, int(rng.integers(1, 6))))   # unsorted, maybe repeated
    for gop in [None, 8]:
      np.testing.assert_array_equal(video.decode_frames(data, wanted, gop=gop),
                                    full_NxHxWx3[wanted], err_msg=f'{wanted} gop={gop}')
  resized = video.decode_frames(data, [28, 3], width=20, height=14)
  expected = [all_frames[i].reformat(width=20, height=14, format='rgb24').to_ndarray()
              for i in [28, 3]]
  np.testing.assert_array_equal(resized, np.stack(expected))
  with pytest.raises(ValueError, match='frame 29 is not in this clip'):
    video.decode_frames(data, [2, 29])
