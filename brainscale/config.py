"""Experiment lookup and command-line overrides.

`--experiment=NAME` resolves to `experiments/NAME.py:get_config()`, an
ml_collections ConfigDict that is locked before overrides apply, so a typo in
`--config.a.b=value` is an error that names the closest existing keys.
"""

import ast
import json
import difflib
import importlib.util
import pathlib
import sys

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / 'experiments'


class ConfigError(ValueError):
  """A user-facing configuration error; its message is one line."""


def experiment_names() -> list[str]:
  return sorted(p.stem for p in EXPERIMENTS.glob('*.py')
                if p.stem != 'base' and not p.stem.startswith('_'))


def load(name: str) -> ml_collections.ConfigDict:
  """Returns the locked config of experiments/NAME.py."""
  path = EXPERIMENTS / f'{name}.py'
  if not path.is_file():
    close = difflib.get_close_matches(name, experiment_names(), n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise ConfigError(f'--experiment={name} is not a file in {EXPERIMENTS}{hint}')
  if str(ROOT) not in sys.path:  # experiments import experiments.base
    sys.path.insert(0, str(ROOT))
  spec = importlib.util.spec_from_file_location(f'experiments.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()
  return config


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
  """Loads experiment NAME and applies the overrides."""
  config = load(name)
  config.experiment = name
  return override(config, overrides)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a saved config (as written beside each checkpoint)."""
  return ml_collections.ConfigDict(json.loads(text))
