"""Counterfactual predictions of a trained world model on frames of one's own.

Two frames of a video file (or two images) are cropped as evaluation crops clips,
the probes of counterfactual.py run on them, and a panel shows the result.
Pixel coordinates are those of the cropped frame the model sees. A bad input
raises InputError, one line naming the value. launch/predict.py is the CLI (it
loads the checkpoint).
"""

import functools
import io
import math
import pathlib

import av
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib import figure, patches

from brainscale.cwm import counterfactual, sequence
from brainscale.cwm.model import WorldModel
from brainscale.data import video
from brainscale.data.importers import InputError

DECODES = ('mean', 'argmax', 'sample')


# ---------------------------------------------------------------- frames

def _read(path, what: str) -> bytes:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f'{path} {"is a folder" if path.is_dir() else "does not exist"}; '
                     f'expected {what}')
  return path.read_bytes()


def _probe(path, data: bytes, what: str) -> tuple[float, int, int, int]:
  """(fps, frames or 0 where the container does not say, width, height) of the first video
  stream, as shown upright; decodes its first frame."""
  try:
    with av.open(io.BytesIO(data)) as container:
      if not container.streams.video:
        raise InputError(f'{path} has no video stream; expected {what}')
      stream = container.streams.video[0]
      frame = next(container.decode(stream), None)
      if frame is None:
        raise InputError(f'{path} holds no frame; expected {what}')
      w, h = (frame.height, frame.width) if video.display_orientation(frame)[0] else \
          (frame.width, frame.height)
      return float(stream.average_rate or 0), stream.frames, w, h
  except InputError:
    raise
  except (av.error.FFmpegError, ValueError) as e:
    raise InputError(f'{path} cannot be decoded ({getattr(e, "strerror", None) or e}); '
                     f'expected {what}') from None


def _decode(path, data: bytes, indices: list[int], w: int, h: int, size: int,
            why: str = '') -> np.ndarray:
  """Frames [F, size, size, 3] uint8 at `indices`: short side resized to size, centre crop."""
  width, height, y0, x0 = video.centre_crop(w, h, size)
  try:
    frames_FxHxWx3 = video.decode_frames(data, indices, width=width, height=height)
  except (av.error.FFmpegError, ValueError) as e:
    raise InputError(f'{path}: {getattr(e, "strerror", None) or e}{why}') from None
  return np.ascontiguousarray(frames_FxHxWx3[:, y0:y0 + size, x0:x0 + size])


def _size(layout: sequence.Layout) -> int:
  if layout.height != layout.width:
    raise ValueError(f'frames of {layout.height}x{layout.width}; predictions crop square frames')
  return layout.height


def video_frames(path, layout: sequence.Layout, *, gap_ms: float,
                 start_s: float = 0.0) -> np.ndarray:
  """Frames [2, H, W, 3] uint8 of a video file, `gap_ms` apart from `start_s` seconds on."""
  if not (math.isfinite(start_s) and start_s >= 0):
    raise InputError(f'--start_s={start_s:g}; expected seconds >= 0')
  if not (math.isfinite(gap_ms) and gap_ms > 0):
    raise InputError(f'--gap_ms={gap_ms:g}; expected milliseconds > 0')
  data = _read(path, 'a video file')
  fps, count, w, h = _probe(path, data, 'a video file')
  if not fps:
    raise InputError(f'{path} has no frame rate; expected a video file')
  gap, first = video.gap_frames(gap_ms, fps), round(start_s * fps)
  why = (f'; --start_s={start_s:g} and --gap_ms={gap_ms:g} ({gap} frames at {fps:g} fps) '
         f'need frames {first} and {first + gap}')
  if count and first + gap >= count:
    raise InputError(f'{path} is too short: {count} frames{why}')
  return _decode(path, data, [first, first + gap], w, h, _size(layout), why)


def image_frames(paths: list, layout: sequence.Layout) -> np.ndarray:
  """Frames [2, H, W, 3] uint8 of two image files (any format FFmpeg reads)."""
  if len(paths) != 2:
    raise InputError(f'--frames={",".join(map(str, paths))}; expected two image files A,B')
  frames = []
  for path in paths:
    data = _read(path, 'an image file')
    _, _, w, h = _probe(path, data, 'an image file')
    frames.append(_decode(path, data, [0], w, h, _size(layout))[0])
  return np.stack(frames)


# ---------------------------------------------------------------- coordinates

def _xy(text: str, flag: str, value: str, form: str) -> tuple[float, float]:
  try:
    x, y = (float(v) for v in text.split(','))
  except ValueError:
    raise InputError(f'{flag}={value!r} is malformed; expected {form} (pixels)') from None
  if not (math.isfinite(x) and math.isfinite(y)):
    raise InputError(f'{flag}={value!r} is malformed; expected finite pixels {form}')
  return x, y


def parse_points(value: str) -> np.ndarray:
  """'X,Y;X,Y;...' -> points [K, 2] (x, y) in pixels."""
  form = 'X,Y;X,Y;...'
  points = [_xy(p, '--points', value, form) for p in value.split(';') if p.strip()]
  if not points:
    raise InputError(f'--points={value!r} is malformed; expected {form} (pixels)')
  return np.array(points, np.float32)


def parse_move(value: str) -> np.ndarray:
  """'X0,Y0:X1,Y1' -> [2, 2]: the pixel of frame 0 to move, and where it goes in frame 1."""
  halves = value.split(':')
  if len(halves) != 2:
    raise InputError(f'--move={value!r} is malformed; expected X0,Y0:X1,Y1 (pixels)')
  return np.array([_xy(h, '--move', value, 'X0,Y0:X1,Y1') for h in halves], np.float32)


def check_inside(points_Kx2: np.ndarray, layout: sequence.Layout, flag: str):
  """InputError naming the first point outside the frame."""
  w, h = layout.width, layout.height
  for x, y in np.asarray(points_Kx2):
    if not (0 <= x < w and 0 <= y < h):
      raise InputError(f'{flag}: the point ({x:g}, {y:g}) is outside the {w}x{h} frame the model '
                       f'sees; expected 0 <= x < {w} and 0 <= y < {h}')


def patch_of(x: float, y: float, layout: sequence.Layout) -> int:
  """The row-major patch id holding pixel (x, y)."""
  return int(y) // layout.patch * layout.grid[1] + int(x) // layout.patch


def revealed_patches(layout: sequence.Layout, reveal: float, seed: int,
                     avoid: tuple = ()) -> np.ndarray:
  """round(reveal * P) frame-1 patches drawn with `seed`, none in `avoid`, one left hidden."""
  if not 0 <= reveal < 1:
    raise InputError(f'--reveal={reveal:g}; expected the fraction of frame-1 patches shown, '
                     'in [0, 1)')
  free = np.setdiff1d(np.arange(layout.patches), np.asarray(avoid, np.int64))
  count = min(round(reveal * layout.patches), len(free) - 1)
  return np.sort(np.random.default_rng(seed).permutation(free)[:count]).astype(np.int32)


# ---------------------------------------------------------------- probes

_STATIC = ('sequential', 'decode', 'sampling')


@functools.partial(nnx.jit, static_argnames=_STATIC)
def _predict(model, frames_Bx2xHxWx3, revealed_BxR, key, *, sequential, decode, sampling):
  return counterfactual.predict_frame(model, frames_Bx2xHxWx3, revealed_BxR,
                                      sequential=sequential, decode=decode, key=key,
                                      **dict(sampling))


@functools.partial(nnx.jit, static_argnames=_STATIC)
def _move(model, frames_Bx2xHxWx3, src_B, dst_B, revealed_BxR, key, *, sequential, decode,
          sampling):
  return counterfactual.move_patch(model, frames_Bx2xHxWx3, src_B, dst_B, revealed_BxR,
                                   sequential=sequential, decode=decode, key=key,
                                   **dict(sampling))


@functools.partial(nnx.jit, static_argnames='orders')
def _kl_flow(model, frames_Bx2xHxWx3, points_BxKx2, key, *, orders):
  return counterfactual.kl_flow(model, frames_Bx2xHxWx3, points_BxKx2, orders=orders, key=key)


def _check_options(decode: str, temperature: float, top_k: int, top_p: float, orders: int):
  if decode not in DECODES:
    raise InputError(f'--decode={decode}; expected one of {", ".join(DECODES)}')
  if not temperature >= 0:
    raise InputError(f'--temperature={temperature:g}; expected >= 0')
  if top_k < 0:
    raise InputError(f'--top_k={top_k}; expected >= 0 (0: all codes)')
  if not 0 < top_p <= 1:
    raise InputError(f'--top_p={top_p:g}; expected a probability in (0, 1]')
  if orders < 1:
    raise InputError(f'--orders={orders}; expected at least 1')


def predict(model: WorldModel, frames_2xHxWx3: np.ndarray, *, reveal: float = 0.25,
            move_2x2: np.ndarray | None = None, points_Kx2: np.ndarray | None = None,
            sequential: bool = False, decode: str = 'mean', temperature: float = 1.0,
            top_k: int = 0, top_p: float = 1.0, orders: int = 4, seed: int = 0) -> dict:
  """The probes on one pair of uint8 frames, as numpy arrays (prediction.npz).

  Always frame0, frame1, prediction [H, W, 3] in [0, 1], hidden [H, W] (predicted
  pixels), codes [h, w], revealed [R] (frame-1 patch ids shown) and patch (pixels).
  With `move_2x2` ((x0, y0) of frame 0 -> (x1, y1) of frame 1): moved, moved_hidden,
  move and move_patches [2] (src, dst). With `points_Kx2` (x, y): points, flow [K, 2]
  in pixels, kl [K, h, w] and cell_centre [K, 2]. The sampling options count only
  for decode='sample'; `seed` draws the revealed patches, samples and KL orders.
  """
  layout = model.layout
  _check_options(decode, temperature, top_k, top_p, orders)
  if frames_2xHxWx3.shape != (2, layout.height, layout.width, 3):
    raise InputError(f'frames of shape {frames_2xHxWx3.shape}; this model needs '
                     f'(2, {layout.height}, {layout.width}, 3)')
  for flag, pts in (('--move', move_2x2), ('--points', points_Kx2)):
    if pts is not None:
      check_inside(pts, layout, flag)
  dst = () if move_2x2 is None else (patch_of(*move_2x2[1], layout),)
  revealed_R = revealed_patches(layout, reveal, seed, avoid=dst)
  sampling = (tuple(dict(temperature=temperature, top_k=top_k, top_p=top_p).items())
              if decode == 'sample' else ())
  options = dict(sequential=sequential, decode=decode, sampling=sampling)
  frames_1x2xHxWx3 = jnp.asarray(frames_2xHxWx3, jnp.uint8)[None]
  revealed_1xR, key = jnp.asarray(revealed_R)[None], jax.random.key(seed)
  out = jax.device_get(_predict(model, frames_1x2xHxWx3, revealed_1xR, key, **options))
  result = {'frame0': frames_2xHxWx3[0], 'frame1': frames_2xHxWx3[1],
            'prediction': np.clip(out['image'][0], 0, 1).astype(np.float32),
            'hidden': out['hidden'][0], 'codes': out['codes'][0], 'revealed': revealed_R,
            'patch': np.int32(layout.patch)}
  if move_2x2 is not None:
    src_dst = np.array([patch_of(*move_2x2[0], layout), dst[0]], np.int32)
    moved = jax.device_get(_move(model, frames_1x2xHxWx3, jnp.asarray(src_dst[:1]),
                                 jnp.asarray(src_dst[1:]), revealed_1xR, key, **options))
    result.update(moved=np.clip(moved['image'][0], 0, 1).astype(np.float32),
                  moved_hidden=moved['hidden'][0], move=np.asarray(move_2x2, np.float32),
                  move_patches=src_dst)
  if points_Kx2 is not None:
    points_1xKx2 = jnp.asarray(points_Kx2, jnp.float32)[None]
    flow = jax.device_get(_kl_flow(model, frames_1x2xHxWx3, points_1xKx2, key, orders=orders))
    result.update(points=np.asarray(points_Kx2, np.float32), flow=flow['flow'][0],
                  kl=flow['kl'][0], cell_centre=flow['cell_centre'][0])
  return result


# ---------------------------------------------------------------- output

def _box(ax, patch_id: int, grid_w: int, size: int, colour: str, style: str = '-'):
  y, x = divmod(int(patch_id), grid_w)
  ax.add_patch(patches.Rectangle((x * size - 0.5, y * size - 0.5), size, size, fill=False,
                                 edgecolor=colour, linestyle=style, linewidth=1.5))


def panel(result: dict) -> figure.Figure:
  """Frame 0 (flow arrows at the points), frame 1, the prediction and the moved prediction."""
  size, w = int(result['patch']), result['frame0'].shape[1]
  shown = [('frame 0', result['frame0']), ('frame 1', result['frame1']),
           (f'prediction ({int(result["hidden"].mean() * 100)}% predicted)', result['prediction'])]
  if 'moved' in result:
    shown.append(('moved: patch at dashed box to solid box', result['moved']))
  fig = figure.Figure(figsize=(3 * len(shown), 3.4), layout='constrained')
  axes = fig.subplots(1, len(shown), squeeze=False)[0]
  for ax, (title, image) in zip(axes, shown):
    ax.imshow(image, interpolation='nearest')
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
  if 'moved' in result:
    src, dst = result['move_patches']
    _box(axes[0], src, w // size, size, 'cyan')
    _box(axes[-1], src, w // size, size, 'cyan', '--')
    _box(axes[-1], dst, w // size, size, 'cyan')
  if 'flow' in result:
    (x, y), (dx, dy) = result['points'].T, result['flow'].T
    axes[0].plot(x, y, 'o', color='yellow', markersize=3)
    axes[0].quiver(x, y, dx, dy, angles='xy', scale_units='xy', scale=1, color='yellow',
                   width=0.015)
    axes[0].set_title('frame 0, KL-traced flow', fontsize=9)
  return fig


def write(result: dict, out) -> list[pathlib.Path]:
  """prediction.npz and panel.png in the folder `out` (made if need be); their paths."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  arrays, png = out / 'prediction.npz', out / 'panel.png'
  np.savez(arrays, **result)
  panel(result).savefig(png, dpi=100)
  return [arrays, png]
