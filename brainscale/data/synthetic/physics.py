"""Synthetic physics videos with exact optical flow, the CWM's default training data.

Textured shapes move, spin, collide and occlude each other over a textured
background under a panning camera. A clip is a pure function of (seed, Spec).
Frames are rendered by inverse mapping (pixel -> world -> object-local ->
procedural texture), so flow and visibility follow from the poses, exactly.
Clips and datasets on disk (mp4, flow, metadata): physics_files.py.
"""

import dataclasses
import math

import numpy as np

F32 = np.float32
TEXTURES = ('stripes', 'checker', 'blobs')


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything that defines a dataset of clips; hashable, JSON via dataclasses.asdict."""
  size: int = 64                                    # frames are size x size pixels
  frames: int = 24                                  # frames per clip
  fps: float = 12.0
  objects: tuple[int, int] = (2, 4)                 # min, max objects per clip
  object_size: tuple[float, float] = (0.15, 0.35)   # bounding radius, fraction of size
  speed: tuple[float, float] = (1.0, 3.0)           # pixels per frame
  spin: float = 0.08                                # max angular speed, radians per frame
  camera: float = 1.0                               # max camera pan speed, pixels per frame
  flow_gap: int = 1                                 # flow goes from frame t to t + flow_gap
  layers: int = 2               # objects collide within a layer; nearer layers pass in front
  margin: float = 0.1           # the bounce box extends the view by margin * size on each side
  texture_period: tuple[float, float] = (6.0, 16.0)   # pixels per cycle of object textures

  def __post_init__(self):
    for name in ('objects', 'object_size', 'speed', 'texture_period'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for problem in _problems(self):
      raise ValueError(f'Spec.{problem}')


def _problems(s: Spec) -> list[str]:
  """What is wrong with a Spec, one line each."""
  checks = [
      (s.size >= 4, f'size={s.size}; need >= 4'),
      (1 <= s.flow_gap < s.frames,
       f'flow_gap={s.flow_gap}; need 1 <= flow_gap < frames={s.frames}'),
      (0 <= s.objects[0] <= s.objects[1], f'objects={s.objects}; need 0 <= min <= max'),
      (0 < s.object_size[0] <= s.object_size[1] <= 0.5,
       f'object_size={s.object_size}; need 0 < min <= max <= 0.5'),
      (0 <= s.speed[0] <= s.speed[1], f'speed={s.speed}; need 0 <= min <= max'),
      (0 < s.texture_period[0] <= s.texture_period[1],
       f'texture_period={s.texture_period}; need 0 < min <= max'),
      (s.fps > 0, f'fps={s.fps}; need > 0'),
      (s.spin >= 0 and s.camera >= 0 and s.margin >= 0,
       f'spin={s.spin}, camera={s.camera}, margin={s.margin}; need >= 0'),
      (s.layers >= 1, f'layers={s.layers}; need >= 1'),
  ]
  return [message for ok, message in checks if not ok]


@dataclasses.dataclass
class Clip:
  """A rendered clip; flow[t, y, x] = (dx, dy): the surface at pixel centre (x, y) of frame t
  is at (x + dx, y + dy) in frame t + gap."""
  frames_TxHxWx3: np.ndarray   # uint8
  flow_TxHxWx2: np.ndarray     # float32 [frames - gap, H, W, 2]: (dx, dy) from t to t + gap
  visible_TxHxW: np.ndarray    # bool [frames - gap, H, W]: surface at (t, y, x) seen at t + gap
  segment_TxHxW: np.ndarray | None = None   # uint8 [frames, H, W]: 0 background, k the k-th object


@dataclasses.dataclass(frozen=True)
class Texture:
  """Plane waves combined by `kind`, squashed by tanh(gain * .), mapped between two colours."""
  kind: str                  # 'stripes' | 'checker' | 'blobs'
  wave_Kx3: np.ndarray       # (kx, ky, phase): radians per pixel, radians
  gain: float
  colour_2x3: np.ndarray     # RGB in [0, 1]


@dataclasses.dataclass(frozen=True)
class Body:
  """A rigid object: a disc, or a convex polygon with its vertices on the bounding circle."""
  radius: float
  vertices_Kx2: np.ndarray | None   # counter-clockwise, object-local; None for a disc
  layer: int
  texture: Texture


@dataclasses.dataclass
class Scene:
  """A clip before rendering: bodies back to front, their poses and the camera per frame."""
  background: Texture
  bodies: tuple[Body, ...]
  camera_Tx2: np.ndarray       # world position of pixel (0, 0)
  position_TxNx2: np.ndarray   # body centres, world pixels
  velocity_TxNx2: np.ndarray   # velocity leaving frame t, pixels per frame
  angle_TxN: np.ndarray        # radians; local -> world is rotation by angle, then + position


# ----------------------------------------------------------------------------- sampling

def _colours(rng) -> np.ndarray:
  """Two random colours of moderate saturation that differ mostly in brightness, so that
  the pattern survives yuv420p (chroma at half resolution)."""
  contrast = rng.uniform(0.3, 0.6)
  lo, hi = contrast / 2, 1 - contrast / 2
  mid_3 = np.clip(rng.uniform(lo, hi) + rng.uniform(-0.25, 0.25, 3), lo, hi)
  step_3 = contrast / 2 + rng.uniform(-0.05, 0.05, 3)
  return np.clip(np.stack([mid_3 - step_3, mid_3 + step_3]), 0, 1)


def _texture(rng, kind: str, periods: tuple[float, float]) -> Texture:
  """A random texture of `kind` whose waves have periods (pixels) drawn from `periods`."""
  count = {'stripes': 1, 'checker': 2, 'blobs': 6}[kind]
  heading = rng.uniform(0, 2 * np.pi)
  if kind == 'blobs':
    heading_K = heading + rng.uniform(0, np.pi, count)
    period_K = rng.uniform(*periods, count)
  else:
    heading_K = heading + np.pi / 2 * np.arange(count)
    period_K = np.full(count, rng.uniform(*periods))
  k_K = 2 * np.pi / period_K
  wave_Kx3 = np.stack([k_K * np.cos(heading_K), k_K * np.sin(heading_K),
                       rng.uniform(0, 2 * np.pi, count)], axis=-1)
  return Texture(kind, wave_Kx3, float(rng.uniform(1.0, 2.0)), _colours(rng))


def _polygon(rng, radius: float) -> np.ndarray | None:
  """Vertices of a disc (None), square, rectangle, triangle or pentagon/hexagon."""
  kind = rng.integers(5)
  if kind == 0:
    return None
  if kind == 1:
    angle_K = np.pi / 4 + np.pi / 2 * np.arange(4)
  elif kind == 2:
    a = rng.uniform(0.45, 0.7)
    angle_K = np.array([a, np.pi - a, np.pi + a, 2 * np.pi - a])
  else:
    k = 3 if kind == 3 else int(rng.integers(5, 7))
    angle_K = 2 * np.pi / k * np.arange(k) + rng.uniform(-1, 1, k) * (0.35 if k == 3 else 0.2)
  return radius * np.stack([np.cos(angle_K), np.sin(angle_K)], axis=-1)


def _box(spec: Spec) -> tuple[float, float]:
  """Camera-relative walls (lo, hi) of the square the discs bounce in."""
  pad = spec.margin * spec.size
  return -pad, spec.size - 1 + pad


def _place(rng, radius_N, layers: int, box) -> tuple[np.ndarray, np.ndarray]:
  """Centres in the box and depth layers such that discs of a layer do not overlap.

  Each disc takes the first layer, in random order, that has room at a random spot;
  one that finds none in 100 tries gets a layer of its own.
  """
  position_Nx2, layer_N = np.zeros((len(radius_N), 2)), np.zeros(len(radius_N), int)
  centre = (box[0] + box[1]) / 2
  for i, r in enumerate(radius_N):
    top = max(layers, layer_N[:i].max(initial=-1) + 1)
    span = max(0.0, (box[1] - box[0]) / 2 - r)
    for _ in range(100):
      p_2 = centre + rng.uniform(-span, span, 2)
      clear_M = np.linalg.norm(position_Nx2[:i] - p_2, axis=-1) >= radius_N[:i] + r
      free = [l for l in rng.permutation(top) if np.all(clear_M[layer_N[:i] == l])]
      if free:
        break
    position_Nx2[i], layer_N[i] = p_2, free[0] if free else top
  return position_Nx2, layer_N


def _camera_velocity(rng, spec: Spec) -> np.ndarray:
  """A pan at a random speed and heading that turns slowly."""
  speed = rng.uniform(0, spec.camera)
  heading_T = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.05, 0.05) * np.arange(spec.frames)
  return speed * np.stack([np.cos(heading_T), np.sin(heading_T)], axis=-1)


def scene(seed: int, spec: Spec) -> Scene:
  """The scene of clip `seed`: bodies, textures and their simulated poses."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
  box = _box(spec)
  radius_N = rng.uniform(*spec.object_size, n) * spec.size
  position_Nx2, layer_N = _place(rng, radius_N, spec.layers, box)
  back_to_front = np.argsort(layer_N, kind='stable')
  radius_N, position_Nx2, layer_N = (a[back_to_front] for a in (radius_N, position_Nx2, layer_N))
  bodies = tuple(Body(float(r), _polygon(rng, r), int(layer),
                      _texture(rng, TEXTURES[rng.integers(3)], spec.texture_period))
                 for r, layer in zip(radius_N, layer_N))
  lo, hi = spec.texture_period
  background = _texture(rng, 'blobs', (lo, 3 * hi))
  heading_N = rng.uniform(0, 2 * np.pi, n)
  velocity_Nx2 = rng.uniform(*spec.speed, n)[:, None] * np.stack(
      [np.cos(heading_N), np.sin(heading_N)], axis=-1)
  angle_N = rng.uniform(0, 2 * np.pi, n)
  spin_N = rng.uniform(-spec.spin, spec.spin, n)
  camera_velocity_Tx2 = _camera_velocity(rng, spec)
  position_TxNx2, velocity_TxNx2, camera_Tx2 = simulate(
      position_Nx2, velocity_Nx2, radius_N, layer_N, camera_velocity_Tx2, box=box)
  angle_TxN = angle_N + spin_N * np.arange(spec.frames)[:, None]
  return Scene(background, bodies, camera_Tx2, position_TxNx2, velocity_TxNx2, angle_TxN)


# ----------------------------------------------------------------------------- physics

def _bounce(relative_Nx2, velocity_Nx2, radius_N, camera_velocity_2, box) -> None:
  """Reflects, in place, velocities of discs that cross a wall moving with the camera."""
  outward_Nx2 = velocity_Nx2 - camera_velocity_2
  low = (relative_Nx2 - radius_N[:, None] < box[0]) & (outward_Nx2 < 0)
  high = (relative_Nx2 + radius_N[:, None] > box[1]) & (outward_Nx2 > 0)
  reflected_Nx2 = 2 * camera_velocity_2 - velocity_Nx2
  np.copyto(velocity_Nx2, reflected_Nx2, where=low | high)


def _collide(position_Nx2, velocity_Nx2, radius_N, layer_N) -> None:
  """Elastic impulses, in place, between approaching touching discs of a layer; mass ∝ r²."""
  d_NxNx2 = position_Nx2[None] - position_Nx2[:, None]
  dist_NxN = np.linalg.norm(d_NxNx2, axis=-1)
  closing_NxN = np.sum((velocity_Nx2[:, None] - velocity_Nx2[None]) * d_NxNx2, axis=-1)
  hit_NxN = ((dist_NxN < radius_N[:, None] + radius_N[None]) & (closing_NxN > 0)
             & (layer_N[:, None] == layer_N[None]) & (dist_NxN > 0))
  for i, j in zip(*np.nonzero(np.triu(hit_NxN, 1))):
    normal_2 = d_NxNx2[i, j] / dist_NxN[i, j]
    closing = (velocity_Nx2[i] - velocity_Nx2[j]) @ normal_2
    if closing <= 0:   # an earlier impulse of this step already separated them
      continue
    mi, mj = radius_N[i] ** 2, radius_N[j] ** 2
    impulse = 2 * closing / (1 / mi + 1 / mj)
    velocity_Nx2[i] -= impulse / mi * normal_2
    velocity_Nx2[j] += impulse / mj * normal_2


def simulate(position_Nx2, velocity_Nx2, radius_N, layer_N, camera_velocity_Tx2, *,
             box: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Discs at constant velocity that collide elastically within a layer and bounce off walls.

  The walls are the camera-relative square [lo, hi]^2 of `box`; the camera moves by
  camera_velocity_Tx2[t] from frame t to t + 1. A sub-step moves a disc by at most
  min(r_min / 8, 0.5) pixels relative to the camera, so discs overlap by less than a
  pixel and never pass through each other.
  Returns position_TxNx2, velocity_TxNx2 (leaving each frame) and camera_Tx2.
  """
  position_Nx2 = np.array(position_Nx2, np.float64).reshape(-1, 2)
  velocity_Nx2 = np.array(velocity_Nx2, np.float64).reshape(-1, 2)
  radius_N, layer_N = np.asarray(radius_N, np.float64), np.asarray(layer_N)
  frames = len(camera_velocity_Tx2)
  camera_2 = np.zeros(2)
  reach = min(radius_N.min() / 8, 0.5) if len(radius_N) else 1.0
  position_TxNx2 = np.empty((frames,) + position_Nx2.shape)
  velocity_TxNx2 = np.empty_like(position_TxNx2)
  camera_Tx2 = np.empty((frames, 2))
  for t in range(frames):
    position_TxNx2[t], velocity_TxNx2[t], camera_Tx2[t] = position_Nx2, velocity_Nx2, camera_2
    if t == frames - 1:
      break
    u_2 = np.asarray(camera_velocity_Tx2[t], np.float64)
    fastest = np.linalg.norm(velocity_Nx2 - u_2, axis=-1).max(initial=0.0)
    steps = max(1, math.ceil(fastest / reach))
    for _ in range(steps):
      position_Nx2 += velocity_Nx2 / steps
      camera_2 = camera_2 + u_2 / steps
      _bounce(position_Nx2 - camera_2, velocity_Nx2, radius_N, u_2, box)
      _collide(position_Nx2, velocity_Nx2, radius_N, layer_N)
  return position_TxNx2, velocity_TxNx2, camera_Tx2


# ----------------------------------------------------------------------------- rendering

def shade(texture: Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Colours [..., 3] in [0, 1] of the texture at local points (u, v) of broadcastable shapes."""
  sines = [np.sin((u * kx + phase) + v * ky) for kx, ky, phase in texture.wave_Kx3.astype(F32)]
  if texture.kind == 'stripes':
    field = sines[0]
  elif texture.kind == 'checker':
    field = 1.5 * sines[0] * sines[1]
  else:
    field = sum(sines) * F32(math.sqrt(2 / len(sines)))
  level = 0.5 + 0.5 * np.tanh(F32(texture.gain) * field)
  colour_2x3 = texture.colour_2x3.astype(F32)
  return colour_2x3[0] + (colour_2x3[1] - colour_2x3[0]) * level[..., None]


def _edges(vertices_Kx2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Unit outward normals and offsets of a counter-clockwise convex polygon: n.p <= h inside."""
  edge_Kx2 = np.roll(vertices_Kx2, -1, axis=0) - vertices_Kx2
  normal_Kx2 = np.stack([edge_Kx2[:, 1], -edge_Kx2[:, 0]], axis=-1)
  normal_Kx2 /= np.linalg.norm(normal_Kx2, axis=-1, keepdims=True)
  return normal_Kx2, np.sum(normal_Kx2 * vertices_Kx2, axis=-1)


def _depth(body: Body, dx, dy, c, s) -> np.ndarray:
  """Signed distance in pixels (> 0 inside) of world offsets (dx, dy) from a body turned by (c, s).

  For a polygon it is the distance to the nearest edge line (exact inside).
  """
  if body.vertices_Kx2 is None:
    return F32(body.radius) - np.sqrt(dx * dx + dy * dy)
  depth = None
  normal_Kx2, offset_K = _edges(body.vertices_Kx2)
  for (nx, ny), h in zip(normal_Kx2.astype(F32), offset_K.astype(F32)):
    edge = (h - (c * nx - s * ny) * dx) - (s * nx + c * ny) * dy   # n turned to world axes
    depth = edge if depth is None else np.minimum(depth, edge)
  return depth


def _surfaces(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
  """offset_SxTx2, angle_SxT: local = R(-angle) (pixel + offset); surface 0 is the background."""
  camera_1xTx2 = scene.camera_Tx2[None]
  offset_SxTx2 = np.concatenate([camera_1xTx2,
                                 camera_1xTx2 - scene.position_TxNx2.transpose(1, 0, 2)])
  angle_SxT = np.concatenate([np.zeros_like(scene.camera_Tx2[None, :, 0]), scene.angle_TxN.T])
  return offset_SxTx2, angle_SxT


def _turn(angle_T) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin [T, 1, 1]."""
  return np.cos(angle_T).astype(F32)[:, None, None], np.sin(angle_T).astype(F32)[:, None, None]


def _offsets(x_W, offset_Tx2) -> tuple[np.ndarray, np.ndarray]:
  """World offsets of pixel centres from a surface's origin: dx [T, 1, W], dy [T, H, 1]."""
  return (x_W[None, None, :] + offset_Tx2[:, 0, None, None].astype(F32),
          x_W[None, :, None] + offset_Tx2[:, 1, None, None].astype(F32))


def _paint(scene: Scene, offset_SxTx2, angle_SxT, x_W) -> tuple[np.ndarray, np.ndarray]:
  """frames_TxHxWx3 (uint8) composited back to front with 1-pixel antialiased edges, and
  segment_TxHxW: the front-most surface whose shape holds each pixel centre."""
  dx, dy = _offsets(x_W, offset_SxTx2[0])
  colour_TxHxWx3 = shade(scene.background, dx, dy)
  segment_TxHxW = np.zeros(colour_TxHxWx3.shape[:-1], np.uint8)
  for k, body in enumerate(scene.bodies, 1):
    c, s = _turn(angle_SxT[k])
    dx, dy = _offsets(x_W, offset_SxTx2[k])
    depth_TxHxW = _depth(body, dx, dy, c, s)
    np.copyto(segment_TxHxW, k, where=depth_TxHxW >= 0)
    alpha_TxHxW = np.clip(depth_TxHxW + 0.5, 0, 1)
    touched = alpha_TxHxW > 0
    u, v = c * dx + s * dy, c * dy - s * dx
    under_Mx3 = colour_TxHxWx3[touched]
    texture_Mx3 = shade(body.texture, u[touched], v[touched])
    colour_TxHxWx3[touched] = under_Mx3 + alpha_TxHxW[touched][:, None] * (texture_Mx3 - under_Mx3)
  frames_TxHxWx3 = np.round(np.clip(colour_TxHxWx3, 0, 1) * 255).astype(np.uint8)
  return frames_TxHxWx3, segment_TxHxW


def _targets(segment_TxHxW, offset_SxTx2, angle_SxT, x_W, gap) -> tuple[np.ndarray, np.ndarray]:
  """Where the surface seen at each pixel of frame t is at t + gap: qx, qy [T - gap, H, W]."""
  n = segment_TxHxW.shape[0] - gap
  qx_TxHxW = np.empty((n,) + segment_TxHxW.shape[1:], F32)
  qy_TxHxW = np.empty_like(qx_TxHxW)
  for k in range(len(offset_SxTx2)):
    offset_Tx2, angle_T = offset_SxTx2[k], angle_SxT[k]
    c, s = _turn(angle_T[gap:] - angle_T[:n])
    dx, dy = _offsets(x_W, offset_Tx2[:n])
    shift_Tx1x1x2 = offset_Tx2[gap:, None, None, :].astype(F32)
    mine_TxHxW = segment_TxHxW[:n] == k
    np.copyto(qx_TxHxW, (c * dx - shift_Tx1x1x2[..., 0]) - s * dy, where=mine_TxHxW)
    np.copyto(qy_TxHxW, (s * dx - shift_Tx1x1x2[..., 1]) + c * dy, where=mine_TxHxW)
  return qx_TxHxW, qy_TxHxW


def _visible(bodies, segment_TxHxW, qx_TxHxW, qy_TxHxW, offset_SxTx2, angle_SxT, gap):
  """visible_TxHxW: the target lies in the frame ([0, size - 1]^2) and no nearer body covers it."""
  size = segment_TxHxW.shape[-1]
  visible = (qx_TxHxW >= 0) & (qx_TxHxW <= size - 1) & (qy_TxHxW >= 0) & (qy_TxHxW <= size - 1)
  seen_TxHxW = segment_TxHxW[:len(qx_TxHxW)]
  for k, body in enumerate(bodies, 1):
    shift_Tx1x1x2 = offset_SxTx2[k, gap:, None, None, :].astype(F32)
    c, s = _turn(angle_SxT[k, gap:])
    depth = _depth(body, qx_TxHxW + shift_Tx1x1x2[..., 0], qy_TxHxW + shift_Tx1x1x2[..., 1], c, s)
    visible &= ~((depth >= 0) & (seen_TxHxW < k))
  return visible


def draw(scene: Scene, spec: Spec) -> Clip:
  """Renders a scene: frames by inverse mapping, flow and visibility from the poses."""
  x_W = np.arange(spec.size, dtype=F32)
  offset_SxTx2, angle_SxT = _surfaces(scene)
  frames_TxHxWx3, segment_TxHxW = _paint(scene, offset_SxTx2, angle_SxT, x_W)
  qx, qy = _targets(segment_TxHxW, offset_SxTx2, angle_SxT, x_W, spec.flow_gap)
  visible_TxHxW = _visible(scene.bodies, segment_TxHxW, qx, qy, offset_SxTx2, angle_SxT,
                           spec.flow_gap)
  flow_TxHxWx2 = np.stack([qx - x_W[None, None, :], qy - x_W[None, :, None]], axis=-1)
  return Clip(frames_TxHxWx3, flow_TxHxWx2, visible_TxHxW, segment_TxHxW)


def render(seed: int, spec: Spec) -> Clip:
  """Clip `seed` of the dataset `spec`: frames, exact flow to t + gap, and visibility."""
  return draw(scene(seed, spec), spec)


def flow_between(scene: Scene, spec: Spec, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact flow [H, W, 2] (dx, dy) from frame t0 to frame t1 (either order) and where the
  surface seen at each pixel of t0 is visible at t1 [H, W]: in the frame, no nearer body over it."""
  x_W = np.arange(spec.size, dtype=F32)
  offset_SxTx2, angle_SxT = _surfaces(scene)
  offset_Sx2x2, angle_Sx2 = offset_SxTx2[:, [t0, t1]], angle_SxT[:, [t0, t1]]
  _, segment_2xHxW = _paint(scene, offset_Sx2x2, angle_Sx2, x_W)
  qx, qy = _targets(segment_2xHxW, offset_Sx2x2, angle_Sx2, x_W, 1)
  visible_1xHxW = _visible(scene.bodies, segment_2xHxW, qx, qy, offset_Sx2x2, angle_Sx2, 1)
  flow_HxWx2 = np.stack([qx[0] - x_W[None, :], qy[0] - x_W[:, None]], axis=-1)
  return flow_HxWx2, visible_1xHxW[0]


def tapvid_tracks(seed: int, spec: Spec, tracks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Clip `seed` in TAP-Vid's layout: frames [T, H, W, 3] uint8, points [N, T, 2] (x, y of
  pixel centres / size) and occluded [N, T], from the exact flow and depth order.

  Half the tracks start on a random pixel of frame 0, half on a random frame, one in two of
  those on an object; each is followed to every frame, backwards too.
  """
  rng = np.random.default_rng([seed, 1])
  sc = scene(seed, spec)
  x_W = np.arange(spec.size, dtype=F32)
  offset_SxTx2, angle_SxT = _surfaces(sc)
  frames_TxHxWx3, segment_TxHxW = _paint(sc, offset_SxTx2, angle_SxT, x_W)
  start_N = np.where(np.arange(tracks) < tracks // 2, 0, rng.integers(0, spec.frames, tracks))
  yx_Nx2 = rng.integers(0, spec.size, (tracks, 2))
  for n in range(tracks):
    on_object = np.argwhere(segment_TxHxW[start_N[n]] > 0)
    if n % 2 and len(on_object):
      yx_Nx2[n] = on_object[rng.integers(len(on_object))]
  points_NxTx2 = np.zeros((tracks, spec.frames, 2), F32)
  occluded_NxT = np.zeros((tracks, spec.frames), bool)
  for t0 in np.unique(start_N):
    mine = np.flatnonzero(start_N == t0)
    y_M, x_M = yx_Nx2[mine, 0], yx_Nx2[mine, 1]
    for t1 in range(spec.frames):
      flow_HxWx2, visible_HxW = flow_between(sc, spec, int(t0), t1)
      points_NxTx2[mine, t1] = np.stack([x_M, y_M], -1) + flow_HxWx2[y_M, x_M]
      occluded_NxT[mine, t1] = ~visible_HxW[y_M, x_M]
  return frames_TxHxWx3, points_NxTx2 / spec.size, occluded_NxT
