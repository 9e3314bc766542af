"""Tests of brainscale.config: experiment lookup, typed overrides, and launch/run.py's errors."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from flax import nnx

from brainscale import config as config_lib
from brainscale.config import ConfigError
from brainscale.train.task import get_task
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent


def locked(tree: dict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(tree)
  c.lock()
  return c


# ----------------------------------------------------------------------------- load

def test_load_smoke_returns_locked_config_with_all_sections():
  c = config_lib.load('smoke')
  assert isinstance(c, ml_collections.ConfigDict)
  assert c.is_locked
  keys = set(config_lib.flat_keys(c))
  assert {'train.steps', 'train.batch_size', 'train.learning_rate', 'checkpoint.every_steps',
          'checkpoint.keep', 'model.vocab', 'model.dim', 'model.compute_dtype',
          'data.length', 'mesh.rules.batch'} <= keys
  assert {f'mesh.{part}.{axis}' for part in ('dcn', 'ici')
          for axis in ('data', 'fsdp', 'sequence', 'tensor')} <= keys
  assert c.task == 'smoke'
  assert isinstance(c.train.steps, int) and isinstance(c.train.learning_rate, float)


@pytest.mark.parametrize('section', ['', 'train', 'mesh.ici'])
def test_load_locks_every_section(section):
  node = config_lib.load('smoke')
  for part in filter(None, section.split('.')):
    node = node[part]
  with pytest.raises(AttributeError, match='stpes'):
    node.stpes = 3


def test_load_gives_a_fresh_config_each_time():
  a = config_lib.load('smoke')
  a.train.steps = 7
  assert config_lib.load('smoke').train.steps != 7


def test_load_unknown_experiment_suggests_close_names():
  with pytest.raises(ConfigError, match='did you mean smoke') as e:
    config_lib.load('smok')
  assert '\n' not in str(e.value)


def test_experiment_names_lists_experiments_but_not_base():
  names = config_lib.experiment_names()
  assert 'smoke' in names
  assert 'base' not in names and '__init__' not in names


def test_resolve_records_experiment_name_and_applies_overrides():
  c = config_lib.resolve('smoke', ['--config.train.steps=5'])
  assert c.experiment == 'smoke'
  assert c.train.steps == 5


# ----------------------------------------------------------------------------- override

@pytest.mark.parametrize('arg, key, expected', [
    ('--config.train.steps=7', 'train.steps', 7),
    ('--config.train.steps=1_000', 'train.steps', 1000),
    ('--config.train.learning_rate=2e-3', 'train.learning_rate', 2e-3),
    ('--config.checkpoint.async_save=false', 'checkpoint.async_save', False),
    ('--config.checkpoint.async_save=True', 'checkpoint.async_save', True),
    ('--config.checkpoint.async_save=0', 'checkpoint.async_save', False),
    ('--config.model.attention=cudnn', 'model.attention', 'cudnn'),
    ('--config.model.attention=a=b', 'model.attention', 'a=b'),        # split at the first '='
    ('--config.model.compute_dtype=1', 'model.compute_dtype', '1'),    # str fields stay str
    ('--config.mesh.rules.batch=', 'mesh.rules.batch', ''),
])
def test_override_parses_into_the_field_type(arg, key, expected):
  c = config_lib.override(config_lib.load('smoke'), [arg])
  section, leaf = key.rsplit('.', 1)
  value = c
  for part in section.split('.'):
    value = value[part]
  value = value[leaf]
  assert value == expected
  assert type(value) is type(expected)


def test_override_int_into_float_field_becomes_float():
  c = config_lib.override(config_lib.load('smoke'), ['--config.train.learning_rate=1'])
  assert c.train.learning_rate == 1.0
  assert type(c.train.learning_rate) is float


def test_override_applies_several_in_order():
  c = config_lib.override(config_lib.load('smoke'),
                          ['--config.train.steps=3', '--config.model.dim=32',
                           '--config.train.steps=4'])
  assert (c.train.steps, c.model.dim) == (4, 32)


@pytest.mark.parametrize('text, expected', [
    ('(3, 4, 5)', (3, 4, 5)),
    ('[3, 4]', (3, 4)),        # a list into a tuple field keeps the field's type
    ('7', (7,)),               # a scalar into a tuple field becomes a 1-tuple
])
def test_override_tuple_field(text, expected):
  c = config_lib.override(locked({'model': {'patch': (1, 2)}}), [f'--config.model.patch={text}'])
  assert c.model.patch == expected
  assert type(c.model.patch) is tuple


def test_override_none_field_takes_any_literal_or_text():
  c = config_lib.override(locked({'a': None, 'b': None}), ['--config.a=3', '--config.b=abc'])
  assert (c.a, c.b) == (3, 'abc')


@pytest.mark.parametrize('arg, key, expected_type', [
    ('--config.train.steps=abc', 'train.steps', 'int'),
    ('--config.train.steps=1.5', 'train.steps', 'int'),
    ('--config.train.steps=True', 'train.steps', 'int'),
    ('--config.train.steps=', 'train.steps', 'int'),
    ('--config.train.learning_rate=fast', 'train.learning_rate', 'float'),
    ('--config.train.learning_rate=True', 'train.learning_rate', 'float'),
    ('--config.checkpoint.async_save=maybe', 'checkpoint.async_save', 'bool'),
    ('--config.checkpoint.async_save=2', 'checkpoint.async_save', 'bool'),
])
def test_override_wrong_type_raises_naming_key_and_type(arg, key, expected_type):
  with pytest.raises(ConfigError) as e:
    config_lib.override(config_lib.load('smoke'), [arg])
  message = str(e.value)
  assert key in message
  assert expected_type in message
  assert '\n' not in message


def test_override_unknown_key_suggests_the_closest_in_one_line():
  with pytest.raises(ConfigError) as e:
    config_lib.override(config_lib.load('smoke'), ['--config.train.stpes=3'])
  message = str(e.value)
  assert 'did you mean train.steps' in message
  assert '\n' not in message


def test_override_unknown_key_without_close_match_still_raises():
  with pytest.raises(ConfigError, match='zzzzzz') as e:
    config_lib.override(config_lib.load('smoke'), ['--config.zzzzzz=3'])
  assert 'did you mean' not in str(e.value)


def test_override_a_section_is_not_a_key():
  with pytest.raises(ConfigError, match='mesh.ici'):
    config_lib.override(config_lib.load('smoke'), ['--config.mesh.ici=3'])


def test_override_without_equals_raises():
  with pytest.raises(ConfigError, match='has no value') as e:
    config_lib.override(config_lib.load('smoke'), ['--config.train.steps'])
  assert '--config.train.steps=VALUE' in str(e.value)


# ----------------------------------------------------------------------------- split_overrides

def test_split_overrides_separates_config_args_keeping_order():
  argv = ['launch/run.py', '--config.train.steps=3', '--experiment=smoke',
          '--config.mesh.ici.data=2', '--config_file=x', '--mode=train', '--config.model.dim']
  overrides, rest = config_lib.split_overrides(argv)
  assert overrides == ['--config.train.steps=3', '--config.mesh.ici.data=2', '--config.model.dim']
  assert rest == ['launch/run.py', '--experiment=smoke', '--config_file=x', '--mode=train']


def test_split_overrides_of_no_config_args():
  assert config_lib.split_overrides(['run.py', '--mode=eval']) == ([], ['run.py', '--mode=eval'])


# ----------------------------------------------------------------------------- launch/run.py

def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
  """launch/run.py in a fresh process with one CPU device (no forced device count)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags())
  return subprocess.run([sys.executable, 'launch/run.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
  """The single 'brainscale:' line that must end stderr (no traceback)."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines, result
  assert 'Traceback' not in result.stderr, result.stderr
  assert sum(line.startswith('brainscale:') for line in lines) == 1, result.stderr
  assert lines[-1].startswith('brainscale:'), result.stderr
  return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize('arg', ['--config.train.stpes=3', '--config.train.steps=abc'])
def test_cli_config_error_exits_2_with_one_line(arg):
  result = run_cli('--experiment=smoke', arg)
  assert result.returncode == 2, result.stderr
  assert 'train.steps' in one_line_error(result)


@pytest.mark.slow
def test_cli_unknown_experiment_exits_2_with_suggestion():
  result = run_cli('--experiment=smok')
  assert result.returncode == 2, result.stderr
  assert 'did you mean smoke' in one_line_error(result)


@pytest.mark.slow
def test_cli_mesh_that_does_not_fit_the_devices_fails_in_one_line(tmp_path):
  result = run_cli('--experiment=smoke', '--mode=train', f'--workdir={tmp_path / "run"}',
                   '--config.mesh.ici.data=3')
  assert result.returncode != 0
  line = one_line_error(result)
  assert 'mesh.ici' in line and 'data=3' in line
  assert 'this job has 1' in line


@dataclasses.dataclass(frozen=True)
class _Spec:
  dim: int
  shape: tuple
  dropout: float = 0.0


def test_typed_builds_a_spec_from_its_fields_only():
  section = ml_collections.ConfigDict({'dim': 8, 'shape': [2, 3], 'param_dtype': 'float32'})
  spec = config_lib.typed(_Spec, section)
  assert spec == _Spec(dim=8, shape=(2, 3), dropout=0.0)   # lists become tuples; a default stays
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.dim = 4


def test_typed_names_every_missing_field_in_one_line():
  with pytest.raises(ConfigError) as e:
    config_lib.typed(_Spec, ml_collections.ConfigDict({'dropout': 0.1}), 'tokenizer.model')
  assert str(e.value) == ('tokenizer.model has no dim, shape, which '
                          'test_config._Spec needs')


@pytest.mark.parametrize('name', config_lib.experiment_names())
def test_every_experiment_builds_its_model_specs(name):
  task = get_task(config_lib.resolve(name, []))
  model = nnx.eval_shape(lambda: task.model(nnx.Rngs(0)))
  assert nnx.state(model, nnx.Param)
