"""Open a brainscale checkpoint in a notebook: its config, model, training curves and data.

    from brainscale import inspect
    run = inspect.load('runs/cwm_tiny')          # the newest step; or step=N
    print(run.parameter_overview())
    curves = run.curves()                        # {'train/loss': (steps, values), ...}
    batch = run.batches('eval')[0]
    run.model                                    # an nnx.Module with the trained params

`load` restores onto the devices of this process (one CPU is enough for a
checkpoint written by many GPUs): the params are restored into the shardings of
a mesh over the local devices, whatever mesh wrote them.
"""

import dataclasses
import json
import pathlib

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from brainscale.train.task import Task


@dataclasses.dataclass
class Run:
  """One checkpoint of one workdir, restored."""
  workdir: pathlib.Path
  step: int
  config: ml_collections.ConfigDict
  task: Task
  params: dict            # the restored params (param dtype), a plain nested dict
  model: nnx.Module       # the model holding them

  def parameter_overview(self) -> str:
    """Shapes, sizes and statistics of every parameter, as a table (clu)."""
    return parameter_overview.get_parameter_overview(self.params)

  def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of the run's TensorBoard events: tag -> (steps, values)."""
    return curves(self.workdir)

  def batches(self, split: str = 'eval', count: int = 1) -> list[dict]:
    """`count` batches of this checkpoint's data pipeline ('train' or 'eval'), as numpy."""
    if split not in ('train', 'eval'):
      raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    if split == 'eval':
      batches = list(self.task.eval_data(0, 1))
      if count > len(batches):
        raise ValueError(f'{count} eval batches asked for; this config has '
                         f'train.eval_batches={len(batches)}')
      return batches[:count]
    data = self.task.train_data(0, 1)
    return [next(data) for _ in range(count)]


def _located(path) -> tuple[pathlib.Path, int | None]:
  """(workdir, step) of a workdir, its checkpoints/, or one step folder in it (that step)."""
  path = pathlib.Path(path).expanduser().resolve()
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    return path.parent.parent, int(path.name)
  if path.name == 'checkpoints':
    return path.parent, None
  return path, None


def _workdir(path) -> pathlib.Path:
  return _located(path)[0]


def steps(path) -> list[int]:
  """The complete checkpoints under `path` (a workdir)."""
  directory = _workdir(path) / 'checkpoints'
  if not directory.is_dir():
    return []
  return Checkpoints(str(directory.parent), keep=1_000_000, async_save=False).steps()


def _typed(saved, like):
  """A saved JSON value in the type of the experiment's own value (lists back to tuples)."""
  if isinstance(like, tuple) and isinstance(saved, list):
    return tuple(_typed(s, l) for s, l in zip(saved, like)) if len(saved) == len(like) else \
        tuple(saved)
  if isinstance(like, float) and isinstance(saved, int):
    return float(saved)
  return saved


def _update(config: ml_collections.ConfigDict, saved: dict):
  for key, value in saved.items():
    if key in config and isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        value, dict):
      _update(config[key], value)
    elif key in config:
      config[key] = _typed(value, config[key])
    else:
      config[key] = value


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """The config written beside a checkpoint, typed as its experiment file types it."""
  name = saved.get('experiment', '')
  if name not in config_lib.experiment_names():
    return config_lib.from_json(json.dumps(saved))   # an experiment this tree no longer has
  config = config_lib.resolve(name, [])
  with config.unlocked():
    _update(config, saved)
  return config


def _local_mesh(config):
  """The config with a mesh over this process's devices (FSDP over all of them)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for axis in parallel.AXES:
      config.mesh.dcn[axis] = 1
      config.mesh.ici[axis] = -1 if axis == 'fsdp' else 1
  return config


def load(path, step: int | None = None) -> Run:
  """The checkpoint at `step` of the workdir `path`, restored here.

  `path` may also be WORKDIR/checkpoints, or WORKDIR/checkpoints/STEP (that step);
  by default the newest step.
  """
  workdir, step_of_path = _located(path)
  step = step_of_path if step is None else step
  available = steps(workdir)
  if not available:
    raise FileNotFoundError(f'no checkpoint in {workdir}: expected a workdir holding '
                            f'checkpoints/STEP/ folders written by launch/run.py')
  if step is None:
    step = available[-1]
  if step not in available:
    raise FileNotFoundError(f'no checkpoint of step {step} in {workdir}; it has steps '
                            f'{", ".join(map(str, available))}')
  checkpoints = Checkpoints(str(workdir), keep=1_000_000, async_save=False)
  config = _local_mesh(saved_config(checkpoints.config(step)))
  setup = step_lib.build(config, parallel.make_mesh(config.mesh, jax.local_devices()))
  state = checkpoints.restore(step, setup.abstract_state)
  checkpoints.close()
  params = state['params']
  model = nnx.merge(setup.graphdef, params)
  return Run(workdir=workdir, step=step, config=config, task=setup.task, params=params,
             model=model)


def curves(workdir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Scalars of the TensorBoard event files in WORKDIR/tb: tag -> (steps, values), by step.

  A step logged twice (a run resumed from an earlier checkpoint) keeps its last value.
  """
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415  (only scalars need TensorBoard)
  found: dict[str, dict[int, float]] = {}
  for path in sorted((_workdir(workdir) / 'tb').glob('events.out.tfevents.*')):
    events = event_accumulator.EventAccumulator(str(path), size_guidance={'scalars': 0})
    events.Reload()
    for tag in events.Tags()['scalars']:
      found.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
  return {tag: (np.asarray(sorted(values)), np.asarray([values[s] for s in sorted(values)]))
          for tag, values in sorted(found.items())}
