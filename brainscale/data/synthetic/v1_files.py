"""Simulated V1 sessions on disk: the neural store with its truth.json, or the Sensorium
2023 layout (for the importers), as brainscale.data.synthetic.v1 simulates them.
Shape key: T samples of the neural clock, C behaviour channels (CHANNELS order).
"""

import json
import pathlib

import numpy as np

from brainscale.data.behavior import CHANNELS
from brainscale.data.synthetic import v1

F32 = np.float32
SENSORIUM_TIERS = {'train': 'train', 'validation': 'live_test_main', 'repeats': 'oracle'}


def session_names(spec: v1.Spec) -> list[str]:
  """'a{animal}s{session}' of every session, animal-major (the order generate writes them)."""
  return [f'a{a}s{s}' for a in range(spec.animals) for s in range(spec.sessions_per_animal)]


def generate(root, spec: v1.Spec = v1.Spec(), *, progress: bool = False,
             overwrite: bool = False) -> list[str]:
  """Simulates every session and writes it into the store at `root`; returns session names."""
  from brainscale.data import neural  # noqa: PLC0415  (simulating needs no tensorstore, grain)
  jobs = [(a, s) for a in range(spec.animals) for s in range(spec.sessions_per_animal)]
  names = session_names(spec)
  if progress:
    import tqdm  # noqa: PLC0415  (only with progress=True)
    jobs = tqdm.tqdm(jobs, desc='synthetic V1 sessions')
  for name, (a, s) in zip(names, jobs):
    data = v1.simulate_session(spec, a, s)
    neural.write_session(
        root, name, animal=f'a{a}', rate=spec.rate, responses_TxN=data['responses'],
        frames_FxHxW=data['frames'], frame_times_F=data['frame_times'],
        behavior_SxC=data['behavior'], behavior_times_S=data['behavior_times'],
        unit_ids=data['unit_ids'], trials=data['trials'], positions_Nx3=data['positions'],
        areas=data['areas'], overwrite=overwrite)
  write_truth(root, spec)
  return names


def truth(spec: v1.Spec, animal: int, session: int) -> dict:
  """Each neuron's true RF of a session, in its store order: unit_ids, centre (x, y px),
  orientation (degrees in [0, 180), the Gabor's wave vector in image axes), wavelength (px)
  and type ('simple' | 'complex')."""
  t = v1.select(v1.neurons(spec, animal), v1.session_neurons(spec, session))
  return {'unit_ids': [str(u) for u in t['unit_ids']],
          'centre': t['centre'].astype(float).round(4).tolist(),
          'orientation': (np.degrees(t['orientation'].astype(float)) % 180).round(4).tolist(),
          'wavelength': t['wavelength'].astype(float).round(4).tolist(),
          'type': ['complex' if c else 'simple' for c in t['complex']]}


def write_truth(root, spec: v1.Spec) -> pathlib.Path:
  """root/truth.json: `truth` of every session, by session name, beside the store."""
  names = session_names(spec)
  data = {name: truth(spec, a, s) for name, (a, s) in zip(
      names, [(a, s) for a in range(spec.animals) for s in range(spec.sessions_per_animal)])}
  path = pathlib.Path(root) / v1.TRUTH_FILE
  partial = path.with_name(f'.{v1.TRUTH_FILE}.partial')
  partial.write_text(json.dumps(data))
  partial.rename(path)
  return path


def write_sensorium(folder, session: dict) -> None:
  """Writes a simulated session in the Sensorium 2023 layout, trial k as <k>.npy:
  data/videos (H, W, frames) float32, data/responses (N, frames), data/behavior (2, frames:
  pupil size, running speed), data/pupil_center (2, frames), meta/neurons/unit_ids (int64),
  meta/neurons/cell_motor_coordinates (N, 3), meta/trials/tiers ('train' | 'live_test_main'
  for validation | 'oracle' for repeats)."""
  folder = pathlib.Path(folder)
  data = {name: folder / 'data' / name for name in
          ('videos', 'responses', 'behavior', 'pupil_center')}
  for path in [*data.values(), folder / 'meta' / 'neurons', folder / 'meta' / 'trials']:
    path.mkdir(parents=True, exist_ok=True)
  times_T = session['frame_times']
  behavior_TxC = v1._interpolate(times_T, session['behavior_times'], session['behavior'])
  trial = session['trials']
  for k, (start, stop) in enumerate(zip(trial['start'], trial['stop'])):
    window = slice(int(start), int(stop))
    b_TxC = behavior_TxC[window]
    arrays = {'videos': np.moveaxis(session['frames'][window], 0, -1).astype(F32),
              'responses': session['responses'][window].T,
              'behavior': b_TxC[:, [CHANNELS.index('pupil_size'),
                                    CHANNELS.index('running_speed')]].T,
              'pupil_center': b_TxC[:, [CHANNELS.index('pupil_x'), CHANNELS.index('pupil_y')]].T}
    for name, array in arrays.items():
      np.save(data[name] / f'{k}.npy', np.ascontiguousarray(array, F32), allow_pickle=False)
  np.save(folder / 'meta/neurons/unit_ids.npy', np.array(session['unit_ids'], np.int64))
  np.save(folder / 'meta/neurons/cell_motor_coordinates.npy',
          np.asarray(session['positions'], F32))
  np.save(folder / 'meta/trials/tiers.npy',
          np.array([SENSORIUM_TIERS[t] for t in trial['tier']]))
