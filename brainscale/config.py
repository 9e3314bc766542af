"""Experiment lookup, command-line overrides, and checks of the values before anything is built.

`--experiment=NAME` resolves to `experiments/NAME.py:get_config()`, an
ml_collections ConfigDict that is locked before overrides apply, so a typo in
`--config.a.b=value` is an error that names the closest existing keys.
`validate` and `check_workdir` turn bad values into one-line ConfigErrors. No JAX here
(--submit imports this module), so the mesh's axis sizes are resolved here too.
"""

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import pathlib
import re
import tempfile

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / 'experiments'


class ConfigError(ValueError):
  """A user-facing configuration error; its message is one line."""


def default_workdir(experiment: str) -> str:
  """Where a run of `experiment` lives without --workdir: runs/EXPERIMENT under the current
  folder, as an absolute path (train, eval and --submit alike)."""
  return os.path.abspath(os.path.join('runs', experiment))


def experiment_names() -> list[str]:
  return sorted(p.stem for p in EXPERIMENTS.glob('*.py')
                if p.stem != 'base' and not p.stem.startswith('_'))


def experiment_summaries() -> dict[str, str]:
  """Each experiment's name and the first line of its docstring, read without running it."""
  return {name: (ast.get_docstring(ast.parse((EXPERIMENTS / f'{name}.py').read_text())) or
                 '').partition('\n')[0]
          for name in experiment_names()}


def load(name: str) -> ml_collections.ConfigDict:
  """Returns the locked config of experiments/NAME.py."""
  config = _module(name).get_config()
  config.lock()
  return config


def _module(name: str):
  """The module experiments/NAME.py, freshly executed."""
  path = EXPERIMENTS / f'{name}.py'
  if not path.is_file():
    close = difflib.get_close_matches(name, experiment_names(), n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise ConfigError(f'--experiment={name} is not a file in {EXPERIMENTS}{hint}')
  spec = importlib.util.spec_from_file_location(f'experiments.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def typed(cls, section: ml_collections.ConfigDict, where: str = 'model'):
  """The dataclass `cls` (a model's spec) from the keys of config section `where` that name its
  fields (lists become tuples; a field with a default may be absent); the section's other
  keys are for others (the trainer's dtypes, the loss)."""
  fields = dataclasses.fields(cls)
  has_default = lambda f: (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
  missing = [f.name for f in fields if f.name not in section and not has_default(f)]
  if missing:
    raise ConfigError(f'{where} has no {", ".join(missing)}, which {cls.__module__}.'
                      f'{cls.__qualname__} needs')
  return cls(**{f.name: tuple(section[f.name]) if isinstance(section[f.name], list)
                else section[f.name] for f in fields if f.name in section})


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += flat_keys(value, f'{prefix}{key}.')
    else:
      keys.append(f'{prefix}{key}')
  return keys


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.KEY=VALUE` arguments from the rest of argv."""
  overrides, rest = [], []
  for arg in argv:
    (overrides if arg.startswith('--config.') else rest).append(arg)
  return overrides, rest


def _parse(text: str, old, key: str):
  """Parses `text` into the type of the current value `old`."""
  if isinstance(old, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ConfigError(f'--config.{key}={text} is not a bool (true or false)')
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if old is None:
      return text
    raise ConfigError(f'--config.{key}={text} is not of type {type(old).__name__} '
                      f'(current value {old!r})') from None
  if old is None:
    return value
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
    return type(old)([value])
  if type(value) is not type(old):
    raise ConfigError(f'--config.{key}={text} is a {type(value).__name__}; '
                      f'{key} expects a {type(old).__name__} (current value {old!r})')
  return value


def override(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies `--config.a.b=value` strings to a locked config, type-checked."""
  keys = flat_keys(config)
  for arg in overrides:
    body = arg.removeprefix('--config.')
    if '=' not in body:
      raise ConfigError(f'{arg} has no value; write --config.{body}=VALUE')
    key, text = body.split('=', 1)
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
      hint = f'; did you mean {", ".join(close)}?' if close else ''
      raise ConfigError(f'--config.{key} is not a key of this experiment{hint}')
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = _parse(text, node[leaf], key)
  return config


def resolve(name: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """Loads experiment NAME and applies the overrides; then each section that names a
  prerequisite run takes that run's model (`prerequisite_models`)."""
  config = _module(name).get_config()
  config.lock()
  config.experiment = name
  override(config, overrides)
  prerequisite_models(config, overrides)
  return config


def prerequisite_models(config: ml_collections.ConfigDict, overrides: list[str]):
  """A section with keys experiment, overrides and model (CWM's `tokenizer`) names a
  prerequisite run: its `model` is that run's (`experiment` with `overrides`), its one
  source, set here once. Without an experiment (no prerequisite run) it is set directly."""
  for key, section in config.items():
    if not (isinstance(section, ml_collections.ConfigDict)
            and {'experiment', 'overrides', 'model'} <= set(section.keys())
            and section.experiment):
      continue
    direct = [o for o in overrides if o.startswith(f'--config.{key}.model.')]
    if direct:
      raise ConfigError(
          f'{direct[0].split("=")[0]}: the {key} comes from {key}.experiment='
          f'{section.experiment}; set its model through --config.{key}.overrides="(\'--config.'
          f'model.KEY=VALUE\',)", or set --config.{key}.experiment= for no prerequisite')
    run = resolve(section.experiment, list(section.overrides))
    with section.unlocked():
      section.model = ml_collections.ConfigDict(run.model.to_dict())


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a saved config (as written beside each checkpoint)."""
  return ml_collections.ConfigDict(json.loads(text))


# ----------------------------------------------------------------------------- mesh shape

AXES = ('data', 'fsdp', 'sequence', 'tensor')


def _fill(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
  """Replaces one -1 in `sizes` by what is left of `total`."""
  for axis, n in sizes.items():
    if n < 1 and n != -1:
      raise ConfigError(f'mesh.{what}.{axis}={n}; an axis size is a positive integer or -1 '
                        f'(the rest)')
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1:
    raise ConfigError(f'mesh.{what} has -1 on {", ".join(free)}; at most one axis may be -1')
  known = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if total % known:
      raise ConfigError(f'mesh.{what} ({_fmt(sizes)}) needs a multiple of {known} devices, '
                        f'this job has {total}')
    sizes = {**sizes, free[0]: total // known}
  if math.prod(sizes.values()) != total:
    raise ConfigError(f'mesh.{what} ({_fmt(sizes)}) needs {math.prod(sizes.values())} '
                      f'devices, this job has {total}')
  return sizes


def _fmt(sizes: dict[str, int]) -> str:
  return ', '.join(f'{a}={n}' for a, n in sizes.items() if n != 1)


def mesh_shape(mesh_config, num_devices: int, num_nodes: int) -> tuple[dict, dict]:
  """Resolves the DCN and ICI axis sizes (no -1 left) for this many devices."""
  for part in ('dcn', 'ici'):
    unknown = set(mesh_config[part].keys()) - set(AXES)
    if unknown:
      raise ConfigError(f'mesh.{part} has unknown axes {sorted(unknown)}; axes are {AXES}')
  dcn = {a: int(mesh_config.dcn.get(a, 1)) for a in AXES}
  ici = {a: int(mesh_config.ici.get(a, 1)) for a in AXES}
  if num_devices % num_nodes:
    raise ConfigError(f'{num_devices} devices do not split evenly over {num_nodes} nodes')
  dcn = _fill(dcn, num_nodes, 'dcn')
  ici = _fill(ici, num_devices // num_nodes, 'ici')
  return dcn, ici


# ----------------------------------------------------------------------------- validate

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_POSITIVE_INT = (lambda v: _is_int(v) and v > 0, 'a positive integer')
_COUNT = (lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
_POSITIVE = (lambda v: _is_number(v) and v > 0, 'a finite number > 0')
_NON_NEGATIVE = (lambda v: _is_number(v) and v >= 0, 'a finite number >= 0')
_FRACTION = (lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]')
_BETA = (lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)')
_LR_SCALE = (_NON_NEGATIVE[0], 'a finite number >= 0 (0 freezes the group)')

# key -> (test, what is expected); keys an experiment does not have are skipped.
RULES = {
    'train.steps': _POSITIVE_INT,
    'train.batch_size': _POSITIVE_INT,
    'train.microbatches': _POSITIVE_INT,
    'train.log_every': _POSITIVE_INT,
    'train.eval_every': (_COUNT[0], 'an integer >= 0 (0: evaluate only at the end)'),
    'train.eval_batches': _POSITIVE_INT,
    'train.learning_rate': _POSITIVE,
    'train.warmup_steps': _COUNT,
    'train.min_lr_ratio': _FRACTION,
    'train.weight_decay': _NON_NEGATIVE,
    'train.b1': _BETA,
    'train.b2': _BETA,
    'train.grad_clip': (_NON_NEGATIVE[0], 'a finite number >= 0 (0: no clipping)'),
    'train.peak_tflops': _POSITIVE,
    'checkpoint.every_steps': _POSITIVE_INT,
    'checkpoint.keep': (_POSITIVE_INT[0], 'a positive integer (checkpoints kept)'),
    'probe.clips': (_COUNT[0], 'an integer >= 0 (0: no probes)'),
    'probe.batch': _POSITIVE_INT,
    'evaluation.sessions': (_COUNT[0], 'an integer >= 0 (0: none scored)'),
    'evaluation.batch': _POSITIVE_INT,
    'report.wandb_mode': (lambda v: v in ('', 'online', 'offline', 'disabled'),
                          "'', online, offline or disabled"),
    'mesh.heartbeat_timeout_s': _POSITIVE_INT,
    'watchdog.restore_s': _POSITIVE,
    'watchdog.compile_s': _POSITIVE,
    'watchdog.step_s': (_NON_NEGATIVE[0], 'a finite number >= 0 (0: learned from the steps)'),
    'watchdog.step_factor': _POSITIVE,
    'watchdog.min_step_s': _POSITIVE,
    'watchdog.warmup_steps': _POSITIVE_INT,
    'watchdog.save_s': _POSITIVE,
    'watchdog.eval_s': _POSITIVE,
    'plan.restart_s': _NON_NEGATIVE,
    'plan.restore_s': _NON_NEGATIVE,
    'plan.save_s': _NON_NEGATIVE,
    'cluster.max_restarts': _COUNT,
    'cluster.max_stalled_restarts': _POSITIVE_INT,
    'cluster.max_excluded': _COUNT,
    'cluster.mtbf_hours': (_NON_NEGATIVE[0], 'a finite number >= 0 (0: Llama 3\'s rate per GPU)'),
}

_MISSING = object()


def _get(config, key: str):
  """config[a][b] for key 'a.b'; _MISSING when a part is absent."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _check(key: str, value, rule):
  test, expected = rule
  if not test(value):
    raise ConfigError(f'{key}={value!r}; expected {expected}')


def _check_groups(groups):
  """train.groups.NAME: a regex pattern, lr_scale >= 0 (0 freezes), weight_decay >= 0."""
  for name, group in groups.items():
    key = f'train.groups.{name}'
    _check(f'{key}.lr_scale', group.get('lr_scale'), _LR_SCALE)
    _check(f'{key}.weight_decay', group.get('weight_decay'), _NON_NEGATIVE)
    try:
      re.compile(group.get('pattern'))
    except (re.error, TypeError) as e:
      raise ConfigError(f'{key}.pattern={group.get("pattern")!r}; expected a regular '
                        f'expression ({e})') from None


def cluster_devices(cluster) -> int:
  """Devices of a `cluster` section's job: one per GPU, or one per node of a CPU job."""
  return cluster.nodes * max(cluster.gpus_per_node, 1)


def batch_axes(config, num_devices: int, num_nodes: int = 1) -> dict[str, int]:
  """Sizes of the mesh axes that mesh.rules.batch shards the batch over (DCN x ICI)."""
  dcn, ici = mesh_shape(config.mesh, num_devices, num_nodes)
  names = [a.strip() for a in str(config.mesh.rules.get('batch', '')).split(',')]
  return {a: dcn[a] * ici[a] for a in names if a in AXES}


def _check_batch(config, num_devices: int, num_nodes: int, num_processes: int):
  """The batch splits into micro-batches, each over the data shards, and over the processes."""
  b, m = config.train.batch_size, config.train.get('microbatches', 1)
  if b % m:
    raise ConfigError(f'train.batch_size={b} does not split into train.microbatches={m}; '
                      f'expected a multiple of {m}')
  axes = batch_axes(config, num_devices, num_nodes)
  shards = math.prod(axes.values())
  if (b // m) % shards:
    split = f' ({m} micro-batches of {b // m})' if m > 1 else ''
    raise ConfigError(f'train.batch_size={b}{split} does not split over {shards} data shards '
                      f'(mesh {_fmt(axes)} on {num_devices} devices); '
                      f'expected a multiple of {m * shards}')
  if b % num_processes:
    raise ConfigError(f'train.batch_size={b} does not split over {num_processes} processes; '
                      f'expected a multiple of {num_processes}')


def validate(config, *, num_devices: int, num_nodes: int = 1, num_processes: int = 1):
  """Raises a one-line ConfigError on the first value the trainer cannot run with.

  Checks the keys of RULES this experiment has, train.groups, the mesh against
  `num_devices` over `num_nodes`, and the batch against the mesh and the processes.
  """
  for key, rule in RULES.items():
    value = _get(config, key)
    if value is not _MISSING:
      _check(key, value, rule)
  groups = _get(config, 'train.groups')
  if groups is not _MISSING:
    _check_groups(groups)
  _check_batch(config, num_devices, num_nodes, num_processes)


# ----------------------------------------------------------------------------- workdir

def _reason(error: OSError) -> str:
  return error.strerror or type(error).__name__


def _existing_ancestor(path: pathlib.Path) -> pathlib.Path:
  return next(p for p in path.absolute().parents if os.path.lexists(p))


def _create(path: pathlib.Path):
  """Makes `path` and its parents; a ConfigError names what stood in the way."""
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    blocker = _existing_ancestor(path)
    why = f'{blocker} is a file' if not blocker.is_dir() else f'{_reason(e)} in {blocker}'
    raise ConfigError(f'workdir={path} cannot be created ({why}); expected a directory '
                      f'this job can create') from None


def _probe_write(path: pathlib.Path):
  """Writes and deletes a temporary file in `path` (os.access is wrong for root and NFS)."""
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ConfigError(f'workdir={path} is not writable ({_reason(e)}); expected a directory '
                      f'this job can write') from None


def check_workdir(path, *, write: bool):
  """Raises a one-line ConfigError if `path` cannot be this run's workdir.

  write=True (train): creates it if missing and checks that a file can be written
  there. write=False (eval): it must be an existing, readable directory.
  """
  path = pathlib.Path(path)
  if os.path.lexists(path) and not path.is_dir():
    what = 'a file' if path.is_file() else 'not a directory'
    raise ConfigError(f'workdir={path} is {what}; expected a directory')
  if write:
    if not path.exists():
      _create(path)
    _probe_write(path)
  elif not path.exists():
    raise ConfigError(f'workdir={path} does not exist; expected the directory of a trained run')
  elif not os.access(path, os.R_OK | os.X_OK):
    raise ConfigError(f'workdir={path} is not readable; expected a directory this job can read')
