"""Open a brainscale checkpoint in a notebook: its config, model, training curves and data.

    from brainscale import inspect
    run = inspect.load('runs/cwm_tiny')          # the newest step; or step=N
    print(run.parameter_overview())
    curves = run.curves()                        # {'train/loss': (steps, values), ...}
    batch = run.batches('eval')[0]
    run.model                                    # an nnx.Module with the trained params

`load` restores onto the devices of this process (one CPU is enough for a
checkpoint written by many GPUs), whatever mesh wrote them: the params alone (never
the optimizer moments or the data state), cast to `dtype` as they are read, laid
out on an inference mesh (data x tensor, `config.inference`): weights split over
`tensor` by heads, MLP and vocab, examples over `data`. Run probes inside
`with run.axis_rules():` so activations and KV caches follow the same layout.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.config import ConfigError
from brainscale.train.checkpoint import Checkpoints
from brainscale.train.task import Task, get_task


@dataclasses.dataclass
class Run:
  """One checkpoint of one workdir, restored."""
  workdir: pathlib.Path
  step: int
  config: ml_collections.ConfigDict
  task: Task
  params: dict            # the restored params (in `dtype`), a plain nested dict
  model: nnx.Module       # the model holding them
  mesh: jax.sharding.Mesh | None = None   # the inference mesh they are laid out on
  rules: dict | None = None               # ... by these logical-axis rules

  def axis_rules(self):
    """The context to run the model in: activations and caches sharded like the params."""
    return parallel.axis_rules(self.mesh, self.rules)

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


def inference(config) -> ml_collections.ConfigDict:
  """The `inference` section of a config (its defaults where a saved config lacks it)."""
  default = ml_collections.ConfigDict(dict(tensor=1, dtype=config.model.param_dtype))
  return config.get('inference', default)


def params_dtype(name) -> jnp.dtype:
  """jnp.dtype(name), if it is a floating dtype; else a one-line ConfigError."""
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ConfigError(f'dtype={name}; expected a floating dtype for the params, such as '
                      'bfloat16 or float32')
  return dtype


def abstract_params(task: Task, mesh: jax.sharding.Mesh, dtype) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params) of the task's model: ShapeDtypeStructs in `dtype` (floating ones)
  sharded on `mesh` by the inference rules; nothing allocated."""
  config = task.config
  model = nnx.eval_shape(lambda: task.model(nnx.Rngs(config.seed)))
  graphdef, params_state = nnx.split(model, nnx.Param)
  rules = parallel.inference_rules(config.mesh.rules)
  tree = {}
  for path, variable in nnx.to_flat_state(params_state):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    kind = dtype if jnp.issubdtype(variable.dtype, jnp.floating) else variable.dtype
    layout = parallel.resolve(variable.get_metadata()['axes'], rules, mesh, variable.shape,
                              strict=False)
    node[path[-1]] = jax.ShapeDtypeStruct(variable.shape, kind,
                                          sharding=jax.sharding.NamedSharding(mesh, layout))
  return graphdef, tree


def load(path, step: int | None = None, *, dtype=None,
         mesh: jax.sharding.Mesh | None = None) -> Run:
  """The params of checkpoint `step` of the workdir `path`, restored here.

  `path` may also be WORKDIR/checkpoints, or WORKDIR/checkpoints/STEP (that step);
  by default the newest step. `dtype` (default the config's inference.dtype) is the
  params' dtype; `mesh` (default: parallel.inference_mesh of this process's devices,
  inference.tensor of them per model copy) is where they are laid out.
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
  dtype = params_dtype(dtype or inference(config).dtype)
  if mesh is None:
    tensor = inference(config).tensor
    if tensor != -1 and jax.local_device_count() % tensor:
      raise ConfigError(f'{config.experiment} is opened with inference.tensor={tensor} devices '
                        f'per copy, and this process has {jax.local_device_count()}; pass '
                        'mesh=parallel.inference_mesh(1) (one device) or a mesh of your own')
    mesh = parallel.inference_mesh(tensor)
  task = get_task(config)
  graphdef, target = abstract_params(task, mesh, dtype)
  try:
    params = checkpoints.restore_params(step, target)
  finally:
    checkpoints.close()
  return Run(workdir=workdir, step=step, config=config, task=task, params=params,
             model=nnx.merge(graphdef, params), mesh=mesh,
             rules=parallel.inference_rules(config.mesh.rules))


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
