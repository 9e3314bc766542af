"""TAP-Vid point tracking of a two-frame flow method, scored as the field scores it.

Reads TAP-Vid's files (DAVIS / RGB-Stacking pickles, Kinetics shards of JPEG bytes) through
an unpickler that admits numpy arrays and plain containers only; runs Opt-CWM's two
protocols ('first': the first visible frame paired with every later one; 'gap': every
visible frame t with t + 5); scores with tapnet's compute_tapvid_metrics at 256 x 256.
Points are (x, y) normalised by the frame's width and height, as in the files.

  python -m brainscale.cwm.tracking --workdir=runs/cwm_tiny --data=synthetic \\
      [--protocol=first|gap] [--method=model|oracle|zero_motion|copy_position]
"""

import argparse
import dataclasses
import json
import pathlib
import pickle
import sys

import av
import numpy as np

THRESHOLDS = (1, 2, 4, 8, 16)      # pixels at 256 x 256
SCORE_SIZE = 256
GAP = 5                            # frames apart in the 'gap' protocol (Opt-CWM's CFG)
PROTOCOLS = ('first', 'gap')


# ----------------------------------------------------------------------------- files

def _latin1(text, encoding='latin1'):
  """_codecs.encode as numpy's protocol-2 pickles use it (bytes from a latin-1 string)."""
  if encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r}; only latin1')
  return text.encode('latin1')


_ALLOWED = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy._core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
    ('numpy.core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
    ('numpy._core.multiarray', 'scalar'): np._core.multiarray.scalar,
    ('numpy.core.multiarray', 'scalar'): np._core.multiarray.scalar,
    ('_codecs', 'encode'): _latin1,
    ('collections', 'OrderedDict'): dict,
}


class _Restricted(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    raise pickle.UnpicklingError(f'refuses {module}.{name}: a TAP-Vid file holds numpy arrays '
                                 'and plain containers only')


def load_pickle(path):
  """The pickle at `path`, read with nothing but numpy arrays and containers (else ValueError)."""
  with open(path, 'rb') as f:
    try:
      return _Restricted(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
      raise ValueError(f'{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from e


@dataclasses.dataclass
class Video:
  """One TAP-Vid video: frames [T, H, W, 3] uint8, points [N, T, 2] (x, y normalised),
  occluded [N, T]; `extra` keeps the entry's other keys."""
  name: str
  frames_TxHxWx3: np.ndarray
  points_NxTx2: np.ndarray
  occluded_NxT: np.ndarray
  extra: dict = dataclasses.field(default_factory=dict)


def decode_jpegs(jpegs) -> np.ndarray:
  """[T, H, W, 3] uint8 from a sequence of JPEG-encoded frames (Kinetics shards)."""
  decoder = av.CodecContext.create('mjpeg', 'r')
  out = []
  for data in jpegs:
    frames = decoder.decode(av.Packet(bytes(data)))
    if len(frames) != 1:
      raise ValueError(f'a frame of {len(bytes(data))} bytes is not one JPEG image')
    out.append(frames[0].to_ndarray(format='rgb24'))
  return np.stack(out)


def _video(name: str, entry, where) -> Video:
  if not isinstance(entry, dict) or not {'video', 'points', 'occluded'} <= entry.keys():
    raise ValueError(f'{where}: entry {name} is not a dict with video, points and occluded')
  frames = entry['video']
  if isinstance(frames, (list, tuple)) or (isinstance(frames, np.ndarray)
                                           and frames.dtype.kind in 'OS'):
    frames = decode_jpegs(frames)
  frames = np.asarray(frames)
  points, occluded = np.asarray(entry['points'], np.float32), np.asarray(entry['occluded'], bool)
  t = frames.shape[0] if frames.ndim == 4 else -1
  if (frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3
      or points.ndim != 3 or points.shape[1:] != (t, 2) or occluded.shape != points.shape[:2]):
    raise ValueError(f'{where}: entry {name} has video {frames.dtype} {frames.shape}, points '
                     f'{points.shape}, occluded {occluded.shape}; expected uint8 [T, H, W, 3], '
                     '[N, T, 2] and [N, T]')
  extra = {k: v for k, v in entry.items() if k not in ('video', 'points', 'occluded')}
  return Video(str(name), frames, points, occluded, extra)


def read(path) -> list[Video]:
  """The videos of a TAP-Vid pickle (dict by name: DAVIS; list: RGB-Stacking, a Kinetics
  shard) or of a folder of Kinetics shards (*_of_*.pkl)."""
  path = pathlib.Path(path)
  files = sorted(path.glob('*_of_*.pkl')) if path.is_dir() else [path]
  if not files:
    raise ValueError(f'{path} holds no *_of_*.pkl shards')
  videos = []
  for file in files:
    data = load_pickle(file)
    items = (data.items() if isinstance(data, dict) else
             ((e.get('video_id', f'{file.stem}/{i}') if isinstance(e, dict) else i, e)
              for i, e in enumerate(data)) if isinstance(data, list) else None)
    if items is None:
      raise ValueError(f'{file}: a {type(data).__name__}; expected a dict or list of videos')
    videos += [_video(name, entry, file) for name, entry in items]
  return videos


def write(path, videos: list[Video]) -> None:
  """A DAVIS-layout pickle (dict by name) of `videos`, written atomically."""
  path = pathlib.Path(path)
  data = {v.name: {'video': v.frames_TxHxWx3, 'points': v.points_NxTx2.astype(np.float32),
                   'occluded': v.occluded_NxT.astype(bool), **v.extra} for v in videos}
  partial = path.with_name(f'.{path.name}.partial')
  partial.write_bytes(pickle.dumps(data, protocol=4))
  partial.rename(path)


# ----------------------------------------------------------------------------- metrics

def tapvid_metrics(query_t_N, gt_occluded_NxT, gt_tracks_NxTx2, pred_occluded_NxT,
                   pred_tracks_NxTx2, mode: str = 'first') -> dict[str, float]:
  """tapnet's compute_tapvid_metrics for one video (fractions, not x100).

  Only frames after the query ('first') or all but the query ('strided') are scored.
  OA counts every scored frame; <δ and Jaccard use strict ||pred - gt||² < δ² (pixels at
  256 x 256); Jaccard = TP / (visible + FP), FP = predicted visible and (occluded or far).
  """
  t = gt_occluded_NxT.shape[1]
  frame_T = np.arange(t)
  query_N1 = np.round(np.asarray(query_t_N)).astype(int)[:, None]
  if mode == 'first':
    scored_NxT = frame_T[None] > query_N1
  elif mode == 'strided':
    scored_NxT = frame_T[None] != query_N1
  else:
    raise ValueError(f"query mode {mode!r}; expected 'first' or 'strided'")
  visible_NxT = ~np.asarray(gt_occluded_NxT, bool)
  pred_visible_NxT = ~np.asarray(pred_occluded_NxT, bool)
  out = {'occlusion_accuracy': np.sum((visible_NxT == pred_visible_NxT) & scored_NxT)
         / np.sum(scored_NxT)}
  d2_NxT = np.sum((np.asarray(pred_tracks_NxTx2, np.float64) - gt_tracks_NxTx2) ** 2, -1)
  within_all, jaccard_all = [], []
  for delta in THRESHOLDS:
    near_NxT = d2_NxT < delta ** 2
    visible = np.sum(visible_NxT & scored_NxT)
    within = np.sum(near_NxT & visible_NxT & scored_NxT) / visible
    tp = np.sum(near_NxT & visible_NxT & pred_visible_NxT & scored_NxT)
    fp = np.sum(pred_visible_NxT & (~visible_NxT | ~near_NxT) & scored_NxT)
    out[f'pts_within_{delta}'], out[f'jaccard_{delta}'] = within, tp / (visible + fp)
    within_all.append(within)
    jaccard_all.append(tp / (visible + fp))
  out['average_pts_within_thresh'] = np.mean(within_all)
  out['average_jaccard'] = np.mean(jaccard_all)
  return {k: float(v) for k, v in out.items()}


def mean_metrics(per_video: list[dict]) -> dict[str, float]:
  """The benchmark numbers: each metric's mean over videos, x100."""
  return {k: 100 * float(np.mean([m[k] for m in per_video])) for k in per_video[0]}


# ----------------------------------------------------------------------------- protocols

@dataclasses.dataclass
class Queries:
  """What one video asks: pairs (t0, t1) of frames and, per pair, the tracks to follow."""
  t0_Q: np.ndarray
  t1_Q: np.ndarray
  track_Q: list[np.ndarray]


def first_queries(occluded_NxT) -> Queries:
  """Each track seen somewhere, from its first visible frame to every later frame."""
  visible_NxT = ~np.asarray(occluded_NxT, bool)
  seen = visible_NxT.any(1)
  first_N = np.argmax(visible_NxT, 1)
  pairs = [(s, e) for s in np.unique(first_N[seen]) for e in range(s + 1, visible_NxT.shape[1])]
  return Queries(np.array([p[0] for p in pairs], int), np.array([p[1] for p in pairs], int),
                 [np.flatnonzero(seen & (first_N == s)) for s, _ in pairs])


def gap_queries(occluded_NxT, gap: int = GAP) -> Queries:
  """Every frame t where a track is visible, with frame t + gap (which may hide it)."""
  visible_NxT = ~np.asarray(occluded_NxT, bool)
  starts = [t for t in range(visible_NxT.shape[1] - gap) if visible_NxT[:, t].any()]
  return Queries(np.array(starts, int), np.array(starts, int) + gap,
                 [np.flatnonzero(visible_NxT[:, t]) for t in starts])


def run_protocol(predict, video: Video, protocol: str, *, batch: int = 4,
                 points: int = 16) -> dict[str, float]:
  """One video's metrics under `protocol` for `predict(video, t0_B, t1_B, points_BxKx2) ->
  (points_BxKx2, occluded_BxK)` (normalised x, y); calls come `batch` pairs by `points`
  tracks, padded, so a jitted predictor compiles once."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol {protocol!r}; expected one of {PROTOCOLS}')
  occluded_NxT, points_NxTx2 = video.occluded_NxT, video.points_NxTx2
  queries = first_queries(occluded_NxT) if protocol == 'first' else gap_queries(occluded_NxT)
  jobs = [(q, chunk) for q in range(len(queries.t0_Q))
          for chunk in np.array_split(queries.track_Q[q], -(-len(queries.track_Q[q]) // points))]
  found = {}
  for i in range(0, len(jobs), batch):
    chunk = jobs[i:i + batch] + [jobs[i]] * (batch - len(jobs[i:i + batch]))
    t0_B = np.array([queries.t0_Q[q] for q, _ in chunk])
    t1_B = np.array([queries.t1_Q[q] for q, _ in chunk])
    tracks_BxK = np.stack([np.resize(n, points) for _, n in chunk])
    at_BxKx2 = points_NxTx2[tracks_BxK, t0_B[:, None]]
    to_BxKx2, occ_BxK = predict(video, t0_B, t1_B, at_BxKx2)
    for (q, tracks), to_Kx2, occ_K in zip(chunk, np.asarray(to_BxKx2), np.asarray(occ_BxK)):
      for k, n in enumerate(tracks):
        found[q, n] = (to_Kx2[k], bool(occ_K[k]))
  scale = SCORE_SIZE
  if protocol == 'first':
    seen = (~occluded_NxT).any(1)
    first_N = np.argmax(~occluded_NxT, 1)[seen]
    gt_NxTx2, gt_occ_NxT = points_NxTx2[seen] * scale, occluded_NxT[seen]
    pred_NxTx2 = np.repeat(gt_NxTx2[np.arange(len(first_N)), first_N][:, None], gt_occ_NxT.shape[1],
                           1)
    pred_occ_NxT = np.zeros_like(gt_occ_NxT)
    row = {n: r for r, n in enumerate(np.flatnonzero(seen))}
    for (q, n), (to_2, occ) in found.items():
      pred_NxTx2[row[n], queries.t1_Q[q]] = to_2 * scale
      pred_occ_NxT[row[n], queries.t1_Q[q]] = occ
    return tapvid_metrics(first_N, gt_occ_NxT, gt_NxTx2, pred_occ_NxT, pred_NxTx2)
  # 'gap': each (pair, track) is a two-frame track: the query (set to the truth), then t + gap.
  keys = sorted(found)
  t0_S, t1_S = queries.t0_Q[[q for q, _ in keys]], queries.t1_Q[[q for q, _ in keys]]
  n_S = np.array([n for _, n in keys])
  gt_Sx2x2 = np.stack([points_NxTx2[n_S, t0_S], points_NxTx2[n_S, t1_S]], 1) * scale
  gt_occ_Sx2 = np.stack([occluded_NxT[n_S, t0_S], occluded_NxT[n_S, t1_S]], 1)
  pred_Sx2x2 = np.stack([gt_Sx2x2[:, 0], np.stack([found[k][0] for k in keys]) * scale], 1)
  pred_occ_Sx2 = np.stack([gt_occ_Sx2[:, 0], np.array([found[k][1] for k in keys])], 1)
  return tapvid_metrics(np.zeros(len(keys)), gt_occ_Sx2, gt_Sx2x2, pred_occ_Sx2, pred_Sx2x2)


def evaluate(predict, videos: list[Video], protocol: str, **kwargs) -> dict[str, float]:
  """AJ, <δ, OA (and per threshold) of `predict` over `videos`, per video then averaged, x100."""
  return mean_metrics([run_protocol(predict, v, protocol, **kwargs) for v in videos])


# ----------------------------------------------------------------------------- methods

def model_frames(video: Video, size: int) -> np.ndarray:
  """The video resized to the model's square frames [T, size, size, 3] uint8 (area-averaged)."""
  import jax  # noqa: PLC0415  (readers and metrics need no JAX)
  frames = video.frames_TxHxWx3
  if frames.shape[1:3] == (size, size):
    return frames
  resized = jax.image.resize(frames.astype(np.float32), (len(frames), size, size, 3), 'linear',
                             antialias=True)
  return np.asarray(np.clip(np.round(resized), 0, 255), np.uint8)


def zero_motion(video, t0_B, t1_B, points_BxKx2):
  """Every point stays where it was asked about, always visible."""
  del video, t0_B, t1_B
  return points_BxKx2, np.zeros(points_BxKx2.shape[:2], bool)


def copy_position(radius: int = 2, threshold: float = 40.0):
  """Points stay, called occluded where the (2 radius + 1)² pixels around them change by more
  than `threshold` grey levels on average between the two frames (copying the query's look)."""
  def predict(video, t0_B, t1_B, points_BxKx2):
    frames = video.frames_TxHxWx3.astype(np.float32)
    h, w = frames.shape[1:3]
    x_BxK = np.clip(np.round(points_BxKx2[..., 0] * w).astype(int), radius, w - 1 - radius)
    y_BxK = np.clip(np.round(points_BxKx2[..., 1] * h).astype(int), radius, h - 1 - radius)
    d = np.arange(-radius, radius + 1)
    ys, xs = y_BxK[..., None, None] + d[:, None], x_BxK[..., None, None] + d[None, :]
    a = frames[t0_B[:, None, None, None], ys, xs]
    b = frames[t1_B[:, None, None, None], ys, xs]
    return points_BxKx2, np.abs(a - b).mean((2, 3, 4)) > threshold
  return predict


def kl_tracker(model, size: int, *, orders: int = 4, occlusion_kl: float = 0.5, seed: int = 0):
  """KL-tracing of `model` (counterfactual.kl_flow) on frames resized to size x size: the
  point moves with its cell's flow; occluded where the KL mass in frame 1 < `occlusion_kl`."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from brainscale.cwm import counterfactual  # noqa: PLC0415

  trace = nnx.jit(lambda m, f, p, k: counterfactual.kl_flow(m, f, p, orders=orders, key=k))
  cache = {}

  def predict(video, t0_B, t1_B, points_BxKx2):
    if video.name not in cache:
      cache.clear()
      cache[video.name] = model_frames(video, size)
    frames = cache[video.name]
    pairs_Bx2xSxSx3 = np.stack([frames[t0_B], frames[t1_B]], 1)
    at_BxKx2 = points_BxKx2 * size
    key = jax.random.key(seed + int(t0_B[0]) * 1000 + int(t1_B[0]))
    out = trace(model, pairs_Bx2xSxSx3, np.asarray(at_BxKx2, np.float32), key)
    mass_BxK = np.asarray(out['kl']).sum((-2, -1))
    return (at_BxKx2 + np.asarray(out['flow'])) / size, occluded_by_kl(mass_BxK, occlusion_kl)
  return predict


def occluded_by_kl(mass, threshold: float) -> np.ndarray:
  """Occluded where the perturbation's KL mass in frame 1 (nats, over all codes) is below
  `threshold`: what was changed in frame 0 reappears nowhere (as Opt-CWM thresholds its
  perturbation response)."""
  return np.asarray(mass) < threshold


def oracle_tracker(tokenizer, layout, *, orders: int = 1, occlusion_kl: float = 0.5):
  """KL-tracing of the oracle (cwm/oracle.py) built, pair by pair, from the exact flow of a
  synthetic video (its entry's physics_seed and physics_spec)."""
  from flax import nnx  # noqa: PLC0415

  from brainscale.cwm import counterfactual, oracle  # noqa: PLC0415
  from brainscale.data.synthetic import physics  # noqa: PLC0415

  trace = nnx.jit(lambda m, f, p: counterfactual.kl_flow(m, f, p, orders=orders))
  scenes = {}

  def predict(video, t0_B, t1_B, points_BxKx2):
    if 'physics_seed' not in video.extra:
      raise ValueError(f'video {video.name} is not synthetic (no physics_seed): the oracle '
                       'needs its exact flow')
    if video.name not in scenes:
      scenes.clear()
      spec = physics.Spec(**json.loads(video.extra['physics_spec']))
      scenes[video.name] = (physics.scene(int(video.extra['physics_seed']), spec), spec)
    scene, spec = scenes[video.name]
    if spec.size != layout.width:
      raise ValueError(f'the oracle runs at the video size {spec.size}; the layout is '
                       f'{layout.width}')
    pairs = [physics.flow_between(scene, spec, int(a), int(b)) for a, b in zip(t0_B, t1_B)]
    model = oracle.Oracle.from_flow(tokenizer, layout, np.stack([p[0] for p in pairs]),
                                    np.stack([p[1] for p in pairs]))
    frames = video.frames_TxHxWx3
    at_BxKx2 = points_BxKx2 * spec.size
    out = trace(model, np.stack([frames[t0_B], frames[t1_B]], 1), np.asarray(at_BxKx2, np.float32))
    mass_BxK = np.asarray(out['kl']).sum((-2, -1))
    return (at_BxKx2 + np.asarray(out['flow'])) / spec.size, occluded_by_kl(mass_BxK, occlusion_kl)
  return predict


# ----------------------------------------------------------------------------- synthetic set

def synthetic_videos(*, count: int, seed: int, spec, tracks: int = 32) -> list[Video]:
  """`count` physics clips as TAP-Vid videos (physics.tapvid_tracks), named clip_000000..."""
  from brainscale.data.synthetic import physics, physics_files  # noqa: PLC0415
  videos = []
  for i in range(count):
    clip_seed = physics_files.clip_seed(seed, i)
    frames, points, occluded = physics.tapvid_tracks(clip_seed, spec, tracks)
    videos.append(Video(f'clip_{i:06d}', frames, points, occluded,
                        {'physics_seed': clip_seed,
                         'physics_spec': json.dumps(dataclasses.asdict(spec))}))
  return videos


# ----------------------------------------------------------------------------- command line

METHODS = ('model', 'oracle', 'zero_motion', 'copy_position')


def table(results: dict[str, dict[str, float]]) -> str:
  """One line per method: AJ, <δ_avg, OA."""
  return '\n'.join(f'{name:14s} AJ {m["average_jaccard"]:6.2f} | <δ_avg '
                   f'{m["average_pts_within_thresh"]:6.2f} | OA {m["occlusion_accuracy"]:6.2f}'
                   for name, m in results.items())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m brainscale.cwm.tracking',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a CWM run folder (its newest checkpoint)')
  parser.add_argument('--data', default='synthetic',
                      help="a TAP-Vid pickle, a folder of Kinetics shards, or 'synthetic'")
  parser.add_argument('--protocol', default='first', choices=PROTOCOLS)
  parser.add_argument('--method', action='append', choices=METHODS,
                      help='repeatable; default all that apply')
  parser.add_argument('--videos', type=int, default=0,
                      help='the first N videos only (0: all; synthetic: 8)')
  parser.add_argument('--tracks', type=int, default=32, help='tracks per synthetic video')
  parser.add_argument('--orders', type=int, default=4)
  parser.add_argument('--occlusion_kl', type=float, default=0.5)
  parser.add_argument('--out', default='', help='write the metrics as JSON here')
  args = parser.parse_args(argv)
  from brainscale import inspect  # noqa: PLC0415  (the CLI loads a checkpoint, as launch/ does)
  try:
    run = inspect.load(args.workdir)
    c = run.config
    videos = (synthetic_set(c, args.videos or 8, args.tracks) if args.data == 'synthetic'
              else read(args.data))
    videos = videos[:args.videos] if args.videos else videos
    methods = args.method or (list(METHODS) if args.data == 'synthetic' else
                              ['model', 'zero_motion', 'copy_position'])
    results = {m: evaluate(_method(m, run.model, c.data.size, args), videos, args.protocol)
               for m in methods}
  except (ValueError, OSError) as e:
    print(f'brainscale: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  print(f'{len(videos)} videos, protocol {args.protocol}, scored at {SCORE_SIZE}x{SCORE_SIZE}')
  print(table(results))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
  return 0


def _method(name, model, size, args):
  if name == 'model':
    return kl_tracker(model, size, orders=args.orders, occlusion_kl=args.occlusion_kl)
  if name == 'oracle':
    return oracle_tracker(model.tokenizer, model.layout, occlusion_kl=args.occlusion_kl)
  return zero_motion if name == 'zero_motion' else copy_position()


def synthetic_set(c, count: int, tracks: int) -> list[Video]:
  """The tracking set of CWM config `c`: `count` of its held-out physics clips
  (data.eval_synthetic's spec and seed) with `tracks` tracks each, as a cached pickle."""
  from brainscale.data import cache  # noqa: PLC0415
  from brainscale.data.synthetic import physics  # noqa: PLC0415
  s = c.data.eval_synthetic
  spec = cache.spec_of(s, physics.Spec)
  root = cache.named('cwm_tapvid', {'spec': dataclasses.asdict(spec), 'count': count,
                                    'seed': s.seed, 'tracks': tracks},
                     (physics, sys.modules[__name__]))   # synthetic_videos lives here

  def make():
    root.mkdir(parents=True, exist_ok=True)
    write(root / 'tapvid.pkl', synthetic_videos(count=count, seed=s.seed, spec=spec,
                                                tracks=tracks))

  return read(cache.make_once(root, 'tapvid.pkl', make) / 'tapvid.pkl')


if __name__ == '__main__':
  sys.exit(main())
