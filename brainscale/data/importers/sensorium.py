"""One mouse of the Sensorium 2023 release (data/*/<trial>.npy, meta/) → a neural store session.

  python -m brainscale.data.importers.sensorium FOLDER ROOT [--session NAME] [--animal NAME]

Trials go back to back on one timeline at `rate`, trailing NaN padding trimmed. Tiers map
train→train, oracle→repeats, live_test_*/final_test_*→test; 'none' trials are skipped.
Trials showing identical videos share a stimulus id. The store is brainscale.data.neural.
"""

import argparse
import dataclasses
import hashlib
import pathlib
import sys

import numpy as np
import tqdm

from brainscale.data import neural
from brainscale.data.behavior import behavior_TxC, uint8_frames
from brainscale.data.importers import InputError, failed, store_errors

MODALITIES = ('videos', 'responses', 'behavior', 'pupil_center')
TIERS = {'train': 'train', 'oracle': 'repeats', 'live_test_main': 'test',
         'live_test_bonus': 'test', 'final_test_main': 'test', 'final_test_bonus': 'test',
         'none': None}


@dataclasses.dataclass
class _Trial:
  id: int
  tier: str
  length: int   # frames left after trimming the NaN padding
  digest: str   # of the trimmed uint8 video


def _required(path: pathlib.Path, expected: str) -> pathlib.Path:
  if not path.exists():
    raise InputError(f'{path} is missing; expected {expected}')
  return path


def _load(path: pathlib.Path, expected: str) -> np.ndarray:
  """The array in path (memory-mapped), or a ValueError naming it."""
  try:
    return np.load(_required(path, expected), mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(f'{path} is not a readable .npy file ({e}); expected {expected}') from None


def _meta(folder: pathlib.Path) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(unit ids, positions [N, 3] um, tier per trial id) from meta/."""
  unit_ids = _load(folder / 'meta/neurons/unit_ids.npy', 'one id per neuron')
  positions_Nx3 = _load(folder / 'meta/neurons/cell_motor_coordinates.npy', 'positions [N, 3]')
  tiers = _load(folder / 'meta/trials/tiers.npy', 'one tier per trial')
  if unit_ids.ndim != 1 or not len(unit_ids):
    raise InputError(f'{folder / "meta/neurons/unit_ids.npy"} has shape {unit_ids.shape}; '
                     'expected one id per neuron, at least one')
  if positions_Nx3.shape != (len(unit_ids), 3):
    raise InputError(f'{folder / "meta/neurons/cell_motor_coordinates.npy"} has shape '
                     f'{positions_Nx3.shape}; expected ({len(unit_ids)}, 3) like unit_ids')
  return [str(u) for u in unit_ids], np.asarray(positions_Nx3, np.float32), np.asarray(tiers)


def _trial_ids(folder: pathlib.Path) -> list[int]:
  """The integer stems of data/videos/*.npy, sorted."""
  for modality in MODALITIES:
    _required(folder / 'data' / modality, f'a folder of one .npy per trial (data/{modality})')
  ids = []
  for path in (folder / 'data/videos').glob('*.npy'):
    if not path.stem.isdigit():
      raise InputError(f'{path} is not named by a trial number; expected data/videos/<int>.npy')
    ids.append(int(path.stem))
  if not ids:
    raise InputError(f'{folder / "data/videos"} holds no <trial>.npy files; expected one per trial')
  return sorted(ids)


def _trial_arrays(folder: pathlib.Path, trial: int, neurons: int) -> dict[str, np.ndarray]:
  """The trial's four arrays (memory-mapped), checked against each other."""
  arrays = {m: _load(folder / 'data' / m / f'{trial}.npy', f'trial {trial} of data/{m}')
            for m in MODALITIES}
  frames = arrays['videos'].shape[-1]
  expected = {'videos': '(H, W, frames)', 'responses': f'({neurons}, {frames})',
              'behavior': f'(2, {frames})', 'pupil_center': f'(2, {frames})'}
  ok = {'videos': arrays['videos'].ndim == 3,
        'responses': arrays['responses'].shape == (neurons, frames),
        'behavior': arrays['behavior'].shape == (2, frames),
        'pupil_center': arrays['pupil_center'].shape == (2, frames)}
  for m in MODALITIES:
    if not ok[m]:
      raise InputError(f'{folder / "data" / m / f"{trial}.npy"} has shape {arrays[m].shape}; '
                       f'expected {expected[m]} (neurons from unit_ids, frames from the video)')
  return arrays


def _trimmed_length(video_HxWxF, responses_NxF) -> int:
  """Frames left after dropping trailing frames whose video or responses are all NaN."""
  length = video_HxWxF.shape[2]
  while length and (np.isnan(video_HxWxF[..., length - 1]).all()
                    or np.isnan(responses_NxF[:, length - 1]).all()):
    length -= 1
  return length


def _gray_uint8(video_HxWxF) -> np.ndarray:
  """[F, H, W] uint8: rounded, clipped to 0..255, NaN pixels 0."""
  return uint8_frames(video_HxWxF).transpose(2, 0, 1)


def _tier(tiers: np.ndarray, trial: int, folder: pathlib.Path) -> str | None:
  if trial >= len(tiers):
    raise InputError(f'trial {trial} has no entry in {folder / "meta/trials/tiers.npy"} '
                     f'({len(tiers)} entries); expected one per trial')
  tier = str(tiers[trial])
  if tier not in TIERS:
    raise InputError(f'trial {trial} has tier {tier!r} in {folder / "meta/trials/tiers.npy"}; '
                     f'expected one of {sorted(TIERS)}')
  return TIERS[tier]


def _scan(folder, ids, neurons, tiers, progress) -> tuple[list[_Trial], dict[str, int]]:
  """Checks every trial; (kept trials, skip counts by reason)."""
  kept, skipped, shape = [], {"tier 'none'": 0, 'empty after trimming': 0}, None
  for trial in tqdm.tqdm(ids, desc='check trials', unit='trial', disable=not progress):
    arrays = _trial_arrays(folder, trial, neurons)
    shape = shape or arrays['videos'].shape[:2]
    if arrays['videos'].shape[:2] != shape:
      raise InputError(f'{folder / "data/videos" / f"{trial}.npy"} has frames of '
                       f'{arrays["videos"].shape[:2]}; expected {shape} like the other trials')
    tier = _tier(tiers, trial, folder)
    length = _trimmed_length(arrays['videos'], arrays['responses']) if tier else 0
    if not length:
      skipped['empty after trimming' if tier else "tier 'none'"] += 1
      continue
    digest = hashlib.sha1(_gray_uint8(arrays['videos'][..., :length]).tobytes()).hexdigest()
    kept.append(_Trial(trial, tier, length, digest))
  if not kept:
    raise InputError(f'{folder} has no trial to import ({skipped}); expected train, oracle or '
                     'test trials with frames that are not NaN')
  return kept, skipped


def _behavior_Fx5(behavior_2xF, pupil_center_2xF, rate: float) -> np.ndarray:
  """[F, 5] in CHANNELS order; pupil_size_change is d(pupil size)/dt per second."""
  return behavior_TxC(pupil_x_T=pupil_center_2xF[0], pupil_y_T=pupil_center_2xF[1],
                      pupil_size_T=np.asarray(behavior_2xF[0], np.float64),
                      running_speed_T=behavior_2xF[1], rate=rate)


def _concatenate(folder, trials: list[_Trial], neurons: int, rate: float, progress) -> dict:
  """responses [T, N], frames [T, H, W] and behaviour [T, 5] of the trials, back to back."""
  stops = np.cumsum([t.length for t in trials])
  starts = stops - [t.length for t in trials]
  height, width = _trial_arrays(folder, trials[0].id, neurons)['videos'].shape[:2]
  responses_TxN = np.empty((stops[-1], neurons), np.float32)
  frames_TxHxW = np.empty((stops[-1], height, width), np.uint8)
  behavior_TxC = np.empty((stops[-1], len(neural.CHANNELS)), np.float32)
  for trial, start, stop in tqdm.tqdm(list(zip(trials, starts, stops)), desc='read trials',
                                      unit='trial', disable=not progress):
    arrays = _trial_arrays(folder, trial.id, neurons)
    responses_TxN[start:stop] = arrays['responses'][:, :trial.length].T
    frames_TxHxW[start:stop] = _gray_uint8(arrays['videos'][..., :trial.length])
    behavior_TxC[start:stop] = _behavior_Fx5(arrays['behavior'][:, :trial.length],
                                             arrays['pupil_center'][:, :trial.length], rate)
  return {'responses_TxN': responses_TxN, 'frames_TxHxW': frames_TxHxW,
          'behavior_TxC': behavior_TxC, 'start': starts, 'stop': stops}


def _stimulus_ids(trials: list[_Trial]) -> np.ndarray:
  """One id per distinct video, numbered in order of first showing."""
  ids = {}
  return np.array([ids.setdefault(t.digest, len(ids)) for t in trials], np.int64)


def import_sensorium(folder, root, *, session: str | None = None, animal: str | None = None,
                     rate: float = 30.0, progress: bool = True, overwrite: bool = False) -> str:
  """Imports one Sensorium 2023 mouse folder as a session of the store at root; its name.

  session defaults to the folder's name, animal to the folder's name up to its first '-'
  (the mouse: 'dynamic29156' of 'dynamic29156-11-10-Video-...').
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise InputError(f'Sensorium folder {folder} is not a folder; expected one with data/, meta/')
  if not rate > 0:
    raise InputError(f'rate {rate}; expected frames per second > 0')
  name = session or folder.name
  unit_ids, positions_Nx3, tiers = _meta(folder)
  ids = _trial_ids(folder)
  first = _load(folder / 'data/videos' / f'{ids[0]}.npy', 'a video (H, W, frames)')
  with store_errors(folder):
    neural.check_fits(root, name, rate=rate, frame_shape=first.shape[:2], overwrite=overwrite)
  trials, skipped = _scan(folder, ids, len(unit_ids), tiers, progress)
  data = _concatenate(folder, trials, len(unit_ids), rate, progress)
  times_T = np.arange(len(data['responses_TxN'])) / rate
  with store_errors(folder):
    neural.write_session(
        root, name, animal=animal or folder.name.split('-')[0], rate=rate,
        responses_TxN=data['responses_TxN'], frames_FxHxW=data['frames_TxHxW'],
        frame_times_F=times_T, behavior_SxC=data['behavior_TxC'], behavior_times_S=times_T,
        unit_ids=unit_ids, positions_Nx3=positions_Nx3, overwrite=overwrite,
        trials={'start': data['start'], 'stop': data['stop'], 'tier': [t.tier for t in trials],
                'stimulus': _stimulus_ids(trials)})
  if progress:
    counts = {tier: sum(t.tier == tier for t in trials) for tier in ('train', 'repeats', 'test')}
    print(f'brainscale: imported {folder} as session {name!r} of {root}: {len(trials)} trials '
          f'({", ".join(f"{k} {v}" for k, v in counts.items())}), {len(times_T)} samples, '
          f'{len(unit_ids)} neurons; skipped {", ".join(f"{v} {k}" for k, v in skipped.items())}')
  return name


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m brainscale.data.importers.sensorium',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('folder', metavar='FOLDER', help="one mouse's folder (data/, meta/)")
  parser.add_argument('root', metavar='ROOT', help='neural store to add the session to')
  parser.add_argument('--session', help='session name; default: the folder name')
  parser.add_argument('--animal', help="animal name; default: the folder name up to its first '-'")
  parser.add_argument('--rate', type=float, default=30.0, help='frames per second')
  parser.add_argument('--overwrite', action='store_true', help='replace a session of that name')
  parser.add_argument('--quiet', action='store_true', help='no progress bars or summary')
  args = parser.parse_args(argv)
  try:
    import_sensorium(args.folder, args.root, session=args.session, animal=args.animal,
                     rate=args.rate, progress=not args.quiet, overwrite=args.overwrite)
  except (InputError, OSError) as e:
    return failed(e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
