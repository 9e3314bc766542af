"""Synthetic physics videos: flow against the frames, physics, determinism, files.

Flow is checked against the rendered frames themselves: sampling frame t + gap
at p + flow must give frame t back. Each test draws its clips from a seed derived
from its node id, so every test (and parametrization) sees different clips.
"""

import dataclasses
import json
import os
import zlib

import av
import numpy as np
import pytest

from brainscale.data.synthetic import physics, physics_files

# Bilinear interpolation of the textures (periods >= 6 px, squashed sinusoids) misses
# by ~2/255 on average; 4/255 leaves room. Pixels near an edge also mix the 1-pixel
# antialiased border into the interpolation, hence a looser bound for all visible pixels.
WARP_CLEAN = 4 / 255
WARP_VISIBLE = 6 / 255
HALF_PIXEL = ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5))


@pytest.fixture
def seed(request) -> int:
  return zlib.crc32(request.node.nodeid.encode()) % (1 << 20)


def bilinear(image_HxWxC, x_HxW, y_HxW):
  """The image at points inside [0, W - 1] x [0, H - 1]."""
  h, w = image_HxWxC.shape[:2]
  x0 = np.clip(np.floor(x_HxW).astype(int), 0, w - 2)
  y0 = np.clip(np.floor(y_HxW).astype(int), 0, h - 2)
  fx, fy = (x_HxW - x0)[..., None], (y_HxW - y0)[..., None]
  top = image_HxWxC[y0, x0] * (1 - fx) + image_HxWxC[y0, x0 + 1] * fx
  bottom = image_HxWxC[y0 + 1, x0] * (1 - fx) + image_HxWxC[y0 + 1, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def interior(segment_HxW):
  """Pixels whose 3x3 neighbourhood shows a single surface."""
  padded = np.pad(segment_HxW, 1, mode='edge')
  h, w = segment_HxW.shape
  same = np.ones((h, w), bool)
  for dy in range(3):
    for dx in range(3):
      same &= padded[dy:dy + h, dx:dx + w] == segment_HxW
  return same


def warp_errors(clip, gap):
  """Per-pixel mean |frame t - frame t+gap at p + flow| over RGB in [0, 1] for `clean` pixels
  (visible, one surface around p and around p + flow) and for all visible pixels; and, on
  the clean pixels, the error of zero flow, of flow off by each of HALF_PIXEL, and |flow|."""
  frames = clip.frames_TxHxWx3.astype(np.float64) / 255
  size = frames.shape[1]
  y, x = np.mgrid[:size, :size]
  clean, visible, zero, off, speed = [], [], [], [], []
  for t, flow_HxWx2 in enumerate(clip.flow_TxHxWx2):
    qx, qy = x + flow_HxWx2[..., 0], y + flow_HxWx2[..., 1]
    seen = clip.visible_TxHxW[t]
    error = lambda qx, qy: np.abs(bilinear(frames[t + gap], np.clip(qx, 0, size - 1),
                                           np.clip(qy, 0, size - 1)) - frames[t]).mean(-1)
    error_HxW = error(qx, qy)
    off_HxWx4 = np.stack([error(qx + dx, qy + dy) for dx, dy in HALF_PIXEL], axis=-1)
    segment, later = clip.segment_TxHxW[t], clip.segment_TxHxW[t + gap]
    ok = seen & interior(segment)
    x0, y0 = (np.clip(np.floor(q).astype(int), 0, size - 2) for q in (qx, qy))
    for dy in (0, 1):
      for dx in (0, 1):
        ok &= interior(later)[y0 + dy, x0 + dx] & (later[y0 + dy, x0 + dx] == segment)
    clean.append(error_HxW[ok])
    visible.append(error_HxW[seen])
    zero.append(np.abs(frames[t + gap] - frames[t]).mean(-1)[ok])
    off.append(off_HxWx4[ok])
    speed.append(np.linalg.norm(flow_HxWx2, axis=-1)[ok])
  return tuple(np.concatenate(e) for e in (clean, visible, zero, off, speed))


# ----------------------------------------------------------------------------- flow

@pytest.mark.parametrize('spec', [
    physics.Spec(),
    physics.Spec(flow_gap=3, frames=12),
    physics.Spec(objects=(0, 0), camera=4.0, frames=12),
    physics.Spec(size=256, frames=4, speed=(4.0, 8.0), objects=(3, 6), object_size=(0.05, 0.2)),
], ids=['default', 'gap3', 'camera_only', 'size256'])
def test_flow_carries_each_pixel_to_where_its_surface_is_next(spec, seed):
  clips = [physics.render(seed + i, spec) for i in range(4)]
  errors = [warp_errors(clip, spec.flow_gap) for clip in clips]
  clean, visible, zero, off, speed = (np.concatenate(e) for e in zip(*errors))
  assert clean.size > 0.5 * sum(c.visible_TxHxW.size for c in clips)
  assert clean.mean() < WARP_CLEAN
  assert visible.mean() < WARP_VISIBLE
  moving = speed >= 0.5   # where zero flow is off by half a pixel or more
  assert moving.mean() > 0.1 and zero[moving].mean() > 3 * clean[moving].mean()
  assert off.mean(axis=0).min() > 2 * clean.mean()   # a biased flow would fit worse


def test_visibility_agrees_with_the_rendered_segments(seed):
  spec = physics.Spec(objects=(3, 5))
  agree, occluded_hits, occluded = 0.0, 0, 0
  for i in range(3):
    clip = physics.render(seed + i, spec)
    t_, y, x = np.indices(clip.visible_TxHxW.shape)
    qx, qy = x + clip.flow_TxHxWx2[..., 0], y + clip.flow_TxHxWx2[..., 1]
    inside = (qx >= 0) & (qx <= spec.size - 1) & (qy >= 0) & (qy <= spec.size - 1)
    near_x, near_y = (np.rint(q).astype(int).clip(0, spec.size - 1) for q in (qx, qy))
    later = clip.segment_TxHxW[t_ + spec.flow_gap, near_y, near_x]
    now = clip.segment_TxHxW[:-spec.flow_gap]
    agree += np.mean((later == now)[clip.visible_TxHxW]) / 3
    hidden = inside & ~clip.visible_TxHxW
    occluded_hits += np.sum((later > now)[hidden])
    occluded += np.sum(hidden)
  assert agree > 0.97
  # hidden in frame: a nearer body covers it
  assert occluded > 0 and occluded_hits > 0.8 * occluded


def test_camera_pan_alone_gives_uniform_flow(seed):
  spec = physics.Spec(objects=(0, 0), camera=2.0, flow_gap=2, frames=10)
  clip, scene = physics.render(seed, spec), physics.scene(seed, spec)
  pan_Tx2 = scene.camera_Tx2[:-2] - scene.camera_Tx2[2:]   # the world moves against the camera
  np.testing.assert_allclose(
      clip.flow_TxHxWx2, np.broadcast_to(pan_Tx2[:, None, None], clip.flow_TxHxWx2.shape),
      atol=1e-4)
  assert np.linalg.norm(pan_Tx2, axis=-1).max() <= 2 * spec.camera + 1e-9
  y, x = np.mgrid[:spec.size, :spec.size]
  qx, qy = x + clip.flow_TxHxWx2[..., 0], y + clip.flow_TxHxWx2[..., 1]
  in_frame = (qx >= 0) & (qx <= spec.size - 1) & (qy >= 0) & (qy <= spec.size - 1)
  np.testing.assert_array_equal(clip.visible_TxHxW, in_frame)


def test_still_camera_and_no_objects_give_still_frames(seed):
  clip = physics.render(seed, physics.Spec(objects=(0, 0), camera=0.0, frames=4))
  assert np.all(clip.flow_TxHxWx2 == 0) and np.all(clip.visible_TxHxW)
  assert np.all(clip.frames_TxHxWx3 == clip.frames_TxHxWx3[0])
  assert clip.frames_TxHxWx3[0].std() > 10   # textured, not flat


def test_objects_move_several_pixels_per_frame(seed):
  spec = physics.Spec()
  speeds = []
  for i in range(3):
    clip, scene = physics.render(seed + i, spec), physics.scene(seed + i, spec)
    pan_Tx2 = scene.camera_Tx2[:-1] - scene.camera_Tx2[1:]
    own_TxHxWx2 = clip.flow_TxHxWx2 - pan_Tx2[:, None, None]   # motion in the world
    speeds.append(np.linalg.norm(own_TxHxWx2, axis=-1)[clip.segment_TxHxW[:-1] > 0])
  assert 1.0 < np.median(np.concatenate(speeds)) < 3.0   # Spec.speed = (1, 3) px per frame


@pytest.mark.parametrize('spin', [0.0, 0.08])
def test_object_flow_follows_the_body_pose(spin, seed):
  spec = physics.Spec(spin=spin, frames=8)
  spreads = []
  for i in range(3):
    clip, scene = physics.render(seed + i, spec), physics.scene(seed + i, spec)
    centre_TxNx2 = scene.position_TxNx2 - scene.camera_Tx2[:, None]   # in pixels
    for t, flow_HxWx2 in enumerate(clip.flow_TxHxWx2):
      for k in range(1, len(scene.bodies) + 1):
        y, x = np.nonzero(clip.segment_TxHxW[t] == k)
        p_Mx2 = np.stack([x, y], axis=-1).astype(np.float64)
        turn = scene.angle_TxN[t + 1, k - 1] - scene.angle_TxN[t, k - 1]
        rotation_2x2 = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        q_Mx2 = (p_Mx2 - centre_TxNx2[t, k - 1]) @ rotation_2x2.T + centre_TxNx2[t + 1, k - 1]
        np.testing.assert_allclose(flow_HxWx2[y, x], q_Mx2 - p_Mx2, atol=1e-3)
        if len(x):
          spreads.append(np.ptp(flow_HxWx2[y, x], axis=0).max())
  assert spreads
  if spin:
    assert max(spreads) > 0.5   # a spinning object's flow is not uniform
  else:
    assert max(spreads) < 1e-3


# ----------------------------------------------------------------------------- physics

def momentum_and_energy(velocity_TxNx2, radius_N):
  mass_N = radius_N ** 2   # mass ∝ area of the bounding disc
  momentum_Tx2 = np.einsum('n,tnd->td', mass_N, velocity_TxNx2)
  energy_T = 0.5 * np.einsum('n,tn->t', mass_N, np.sum(velocity_TxNx2 ** 2, -1))
  return momentum_Tx2, energy_T


def head_on(rng, frames=40):
  """Two discs that meet near the middle of a huge box; the camera is still."""
  radius_N = rng.uniform(4, 10, 2)
  aim = rng.uniform(-0.6, 0.6) * radius_N.sum()   # impact parameter; drift adds < 3 px
  position_Nx2 = np.array([[0.0, 0.0], [60.0, aim]])
  velocity_Nx2 = np.array([[rng.uniform(1, 3), rng.uniform(-0.05, 0.05)],
                           [-rng.uniform(1, 3), rng.uniform(-0.05, 0.05)]])
  return position_Nx2, velocity_Nx2, radius_N, np.zeros((frames, 2))


def test_collision_changes_velocities_and_conserves_momentum_and_energy(seed):
  rng = np.random.default_rng(seed)
  position_Nx2, velocity_Nx2, radius_N, camera_Tx2 = head_on(rng)
  position_TxNx2, velocity_TxNx2, _ = physics.simulate(
      position_Nx2, velocity_Nx2, radius_N, [0, 0], camera_Tx2, box=(-1e4, 1e4))
  assert np.abs(velocity_TxNx2[-1] - velocity_TxNx2[0]).max() > 0.1
  momentum_Tx2, energy_T = momentum_and_energy(velocity_TxNx2, radius_N)
  np.testing.assert_allclose(momentum_Tx2, np.broadcast_to(momentum_Tx2[0], momentum_Tx2.shape),
                             atol=1e-9)
  np.testing.assert_allclose(energy_T, energy_T[0], rtol=1e-12)
  gap_T = np.linalg.norm(position_TxNx2[:, 1] - position_TxNx2[:, 0], axis=-1) - radius_N.sum()
  closing = np.linalg.norm(velocity_Nx2[0] - velocity_Nx2[1])
  assert -1.0 < gap_T.min() < closing   # they touched between two frames; never passed through
  # The impulse is along the line of centres at the moment of contact (from the free paths).
  d_2, dv_2 = position_Nx2[1] - position_Nx2[0], velocity_Nx2[1] - velocity_Nx2[0]
  a, b, c = dv_2 @ dv_2, 2 * d_2 @ dv_2, d_2 @ d_2 - radius_N.sum() ** 2
  normal_2 = d_2 + dv_2 * (-b - np.sqrt(b * b - 4 * a * c)) / (2 * a)
  change_2 = velocity_TxNx2[-1, 0] - velocity_TxNx2[0, 0]
  sine = np.cross(normal_2, change_2) / np.linalg.norm(normal_2) / np.linalg.norm(change_2)
  assert abs(sine) < 0.05


def test_discs_in_different_layers_pass_each_other(seed):
  rng = np.random.default_rng(seed)
  position_Nx2, velocity_Nx2, radius_N, camera_Tx2 = head_on(rng)
  position_TxNx2, velocity_TxNx2, _ = physics.simulate(
      position_Nx2, velocity_Nx2, radius_N, [0, 1], camera_Tx2, box=(-1e4, 1e4))
  np.testing.assert_array_equal(velocity_TxNx2, np.broadcast_to(velocity_Nx2, velocity_TxNx2.shape))
  apart_Tx2 = position_TxNx2[:, 1] - position_TxNx2[:, 0]
  assert apart_Tx2[0, 0] > 0 > apart_Tx2[-1, 0]   # they passed through each other


def test_walls_follow_the_camera_and_reflect_relative_velocity(seed):
  rng = np.random.default_rng(seed)
  camera_velocity_Tx2 = np.tile(rng.uniform(-1, 1, 2), (60, 1))
  velocity_Nx2 = camera_velocity_Tx2[:1] + rng.choice([-1, 1], 2) * rng.uniform(1, 3, 2)
  position_TxNx2, velocity_TxNx2, camera_Tx2 = physics.simulate(
      [[32.0, 32.0]], velocity_Nx2, [8.0], [0], camera_velocity_Tx2, box=(-6.0, 69.0))
  relative_Tx2 = position_TxNx2[:, 0] - camera_Tx2
  assert relative_Tx2.min() - 8 > -6 - 1 and relative_Tx2.max() + 8 < 69 + 1
  outward_Tx2 = velocity_TxNx2[:, 0] - camera_velocity_Tx2
  np.testing.assert_allclose(np.abs(outward_Tx2), np.abs(velocity_Nx2 - camera_velocity_Tx2),
                             atol=1e-12)
  assert np.all(np.any(np.sign(outward_Tx2) != np.sign(outward_Tx2[0]), axis=0))   # it bounced


def test_sampled_scenes_collide_without_interpenetration(seed):
  spec = physics.Spec(objects=(3, 5))
  touches, worst = 0, np.inf
  for i in range(10):
    scene = physics.scene(seed + i, spec)
    radius_N = np.array([body.radius for body in scene.bodies])
    layer_N = np.array([body.layer for body in scene.bodies])
    momentum_Tx2, energy_T = momentum_and_energy(scene.velocity_TxNx2, radius_N)
    for a in range(len(radius_N)):
      for b in range(a + 1, len(radius_N)):
        if layer_N[a] == layer_N[b]:
          gap_T = np.linalg.norm(scene.position_TxNx2[:, a] - scene.position_TxNx2[:, b], axis=-1)
          gap_T -= radius_N[a] + radius_N[b]
          worst = min(worst, gap_T.min())
          touches += gap_T.min() < 0.5
  assert touches > 0 and worst > -1.0


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_clip_other_seed_other_clip(seed):
  spec = physics.Spec(frames=6)
  a, b, c = physics.render(seed, spec), physics.render(seed, spec), physics.render(seed + 1, spec)
  for name in ('frames_TxHxWx3', 'flow_TxHxWx2', 'visible_TxHxW', 'segment_TxHxW'):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert not np.array_equal(a.frames_TxHxWx3, c.frames_TxHxWx3)
  assert not np.array_equal(a.flow_TxHxWx2, c.flow_TxHxWx2)


def test_clip_shapes_and_types():
  spec = physics.Spec(size=32, frames=7, flow_gap=2)
  clip = physics.render(0, spec)
  assert clip.frames_TxHxWx3.shape == (7, 32, 32, 3) and clip.frames_TxHxWx3.dtype == np.uint8
  assert clip.flow_TxHxWx2.shape == (5, 32, 32, 2) and clip.flow_TxHxWx2.dtype == np.float32
  assert clip.visible_TxHxW.shape == (5, 32, 32) and clip.visible_TxHxW.dtype == bool


def test_spec_is_hashable_json_and_checked():
  spec = physics.Spec(objects=(1, 3), flow_gap=2)
  again = physics.Spec(**json.loads(json.dumps(dataclasses.asdict(spec))))
  assert again == spec and hash(again) == hash(spec)
  with pytest.raises(ValueError, match='flow_gap'):
    physics.Spec(frames=4, flow_gap=4)
  with pytest.raises(ValueError, match='objects'):
    physics.Spec(objects=(3, 2))


# ----------------------------------------------------------------------------- files

def decode(path):
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    rate = stream.average_rate
    frames = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(stream)])
  return frames, rate


def psnr(a, b):
  return 10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.mark.parametrize('suffix', ['.mp4', '.mkv'])
def test_video_round_trip(suffix, seed, tmp_path):
  spec = physics.Spec()
  clips = [physics.render(seed + i, spec).frames_TxHxWx3 for i in range(2)]
  decoded = []
  for i, frames in enumerate(clips):
    physics_files.write_video(tmp_path / f'{i}{suffix}', frames, spec.fps)
    frames_back, rate = decode(tmp_path / f'{i}{suffix}')
    assert frames_back.shape == frames.shape and rate == spec.fps
    decoded.append(frames_back)
  assert psnr(np.stack(decoded), np.stack(clips)) > 30


def test_write_video_rejects_odd_sides(tmp_path):
  with pytest.raises(ValueError, match='even'):
    physics_files.write_video(tmp_path / 'odd.mp4', np.zeros((2, 33, 33, 3), np.uint8), 12.0)


SMALL = physics.Spec(size=32, frames=6)


def test_generate_writes_clips_flow_and_metadata(seed, tmp_path):
  paths = physics_files.generate(tmp_path / 'set', count=3, seed=seed, spec=SMALL)
  assert paths == [tmp_path / 'set' / f'clip_{i:06d}.mp4' for i in range(3)]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['set']   # no partial directory left
  for i, path in enumerate(paths):
    meta = json.loads(path.with_suffix('.json').read_text())
    assert meta == {'flow_gap_frames': 1, 'fps': 12.0, 'seed': physics_files.clip_seed(seed, i),
                    'size': 32, 'frames': 6}
    clip = physics.render(meta['seed'], SMALL)
    flow = np.load(path.with_suffix('.flow.npy'), allow_pickle=False)
    assert flow.dtype == np.float16 and flow.shape == (5, 32, 32, 2)
    np.testing.assert_allclose(flow, clip.flow_TxHxWx2, atol=2e-2)
    frames, _ = decode(path)
    assert psnr(frames, clip.frames_TxHxWx3) > 25
  spec_json = json.loads((tmp_path / 'set' / 'spec.json').read_text())
  assert spec_json == {'spec': json.loads(json.dumps(dataclasses.asdict(SMALL))),
                       'count': 3, 'seed': seed}


def test_generate_twice_renders_once(seed, tmp_path, monkeypatch):
  paths = physics_files.generate(tmp_path / 'set', count=2, seed=seed, spec=SMALL)
  stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / 'set').iterdir()}
  monkeypatch.setattr(physics, 'render', lambda *a, **k: pytest.fail('rendered again'))
  assert physics_files.generate(tmp_path / 'set', count=2, seed=seed, spec=SMALL) == paths
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / 'set').iterdir()} == stamps


@pytest.mark.parametrize('change', [dict(spec=physics.Spec(size=16, frames=6)), dict(count=3),
                                    dict(seed=1)])
def test_generate_refuses_a_directory_holding_another_dataset(change, tmp_path):
  physics_files.generate(tmp_path / 'set', **{'count': 2, 'seed': 0, 'spec': SMALL})
  with pytest.raises(ValueError, match='delete it or choose another') as raised:
    physics_files.generate(tmp_path / 'set', **({'count': 2, 'seed': 0, 'spec': SMALL} | change))
  assert str(tmp_path / 'set') in str(raised.value) and '\n' not in str(raised.value)


def test_generate_refuses_a_foreign_directory(tmp_path):
  (tmp_path / 'set').mkdir()
  (tmp_path / 'set' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match=str(tmp_path / 'set')):
    physics_files.generate(tmp_path / 'set', count=1, seed=0, spec=SMALL)


def test_interrupted_generate_leaves_nothing_that_counts(seed, tmp_path, monkeypatch):
  real_write_video, calls = physics_files.write_video, []

  def failing_write_video(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 2:
      raise KeyboardInterrupt
    real_write_video(*args, **kwargs)

  monkeypatch.setattr(physics_files, 'write_video', failing_write_video)
  with pytest.raises(KeyboardInterrupt):
    physics_files.generate(tmp_path / 'set', count=3, seed=seed, spec=SMALL)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.setattr(physics_files, 'write_video', real_write_video)
  # A process killed mid-way leaves its partial sibling behind; it is not mistaken for the set.
  stale = tmp_path / '.set.partial-killed'
  stale.mkdir()
  (stale / 'clip_000000.mp4').write_bytes(b'')
  paths = physics_files.generate(tmp_path / 'set', count=3, seed=seed, spec=SMALL)
  assert all(p.stat().st_size > 0 for p in paths)
  assert (tmp_path / 'set' / 'spec.json').is_file()


def test_workers_give_the_same_bytes(seed, tmp_path):
  one = physics_files.generate(tmp_path / 'one', count=4, seed=seed, spec=SMALL, workers=1)
  two = physics_files.generate(tmp_path / 'two', count=4, seed=seed, spec=SMALL, workers=2)
  names = sorted(os.listdir(tmp_path / 'one'))
  assert names == sorted(os.listdir(tmp_path / 'two')) and len(names) == 4 * 3 + 1
  for name in names:
    assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes(), name
  assert [p.name for p in one] == [p.name for p in two]
