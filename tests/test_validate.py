"""Tests of config.validate and config.check_workdir (one-line errors before anything is
built), and of report.Writer on a workdir it cannot write."""

import math
import os
import pathlib
import tempfile

import pytest

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.config import ConfigError
from brainscale.train import report


def devices_of(config) -> tuple[int, int, int]:
  """(devices, nodes, processes) of an experiment: its cluster section's, else one device."""
  if 'cluster' not in config:
    return 1, 1, 1
  cl = config.cluster
  tasks = cl.tasks_per_node or max(cl.gpus_per_node, 1)
  return cl.nodes * max(cl.gpus_per_node, 1), cl.nodes, cl.nodes * tasks


def one_line_error(config, **devices) -> str:
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, **{'num_devices': 1, **devices})
  message = str(e.value)
  assert '\n' not in message
  return message


# ----------------------------------------------------------------------------- experiments

@pytest.mark.parametrize('name', config_lib.experiment_names())
def test_every_experiment_validates_at_its_own_device_count(name):
  config = config_lib.resolve(name, [])
  devices, nodes, processes = devices_of(config)
  config_lib.validate(config, num_devices=devices, num_nodes=nodes, num_processes=processes)


def test_a_cluster_experiment_does_not_fit_one_node():
  config = config_lib.resolve('cwm_80b', [])
  assert devices_of(config) == (192, 24, 192)
  assert one_line_error(config, num_devices=8).startswith('mesh.dcn')


# ----------------------------------------------------------------------------- one value

BAD = [
    ('smoke', 'train.steps', '-5'),
    ('smoke', 'train.steps', '0'),
    ('smoke', 'train.batch_size', '0'),
    ('smoke', 'train.microbatches', '0'),
    ('smoke', 'train.log_every', '0'),
    ('smoke', 'train.eval_every', '-1'),
    ('smoke', 'train.eval_batches', '0'),
    ('smoke', 'train.learning_rate', '0.0'),
    ('smoke', 'train.learning_rate', '-0.001'),
    ('smoke', 'train.learning_rate', 'inf'),
    ('smoke', 'train.warmup_steps', '-1'),
    ('smoke', 'train.min_lr_ratio', '-0.1'),
    ('smoke', 'train.min_lr_ratio', '1.5'),
    ('smoke', 'train.weight_decay', '-0.01'),
    ('smoke', 'train.b1', '1.0'),
    ('smoke', 'train.b2', '-0.5'),
    ('smoke', 'train.grad_clip', '-1.0'),
    ('smoke', 'train.peak_tflops', '0.0'),
    ('smoke', 'checkpoint.every_steps', '0'),
    ('smoke', 'checkpoint.keep', '0'),
    ('smoke', 'train.groups.no_decay.lr_scale', '-1.0'),
    ('smoke', 'train.groups.no_decay.weight_decay', '-0.1'),
    ('smoke', 'train.groups.no_decay.pattern', "'('"),
    ('cwm_tiny', 'probe.batch', '0'),
    ('cwm_tiny', 'probe.clips', '-1'),
    ('enigma_tiny', 'evaluation.batch', '0'),
    ('enigma_tiny', 'evaluation.sessions', '-1'),
]


def override_value(text: str) -> str:
  """What goes after '=' on the command line ('inf' is written as an overflowing literal)."""
  return {'inf': '1e999', "'('": '('}.get(text, text)


@pytest.mark.parametrize('name, key, value', BAD)
def test_a_bad_value_is_a_one_line_error_naming_key_and_value(name, key, value):
  config = config_lib.resolve(name, [f'--config.{key}={override_value(value)}'])
  message = one_line_error(config)
  assert message.startswith(f'{key}={value};'), message
  assert 'expected' in message


def test_a_random_negative_step_count_is_named(rng):
  steps = -int(rng.integers(1, 10**6))
  config = config_lib.resolve('smoke', [f'--config.train.steps={steps}'])
  assert one_line_error(config) == f'train.steps={steps}; expected a positive integer'


@pytest.mark.parametrize('key, value', [
    ('train.eval_every', '0'),          # 0: evaluate only at the end
    ('train.grad_clip', '0.0'),         # 0: no clipping
    ('train.warmup_steps', '0'),
    ('train.weight_decay', '0.0'),
    ('train.groups.no_decay.lr_scale', '0.0'),   # 0 freezes the group
])
def test_the_documented_zeros_are_accepted(key, value):
  config_lib.validate(config_lib.resolve('smoke', [f'--config.{key}={value}']), num_devices=1)


def test_keys_an_experiment_does_not_have_are_not_checked():
  config = config_lib.resolve('smoke', [])
  assert 'probe' not in config and 'evaluation' not in config
  config_lib.validate(config, num_devices=1)


# ----------------------------------------------------------------------------- batch vs mesh

def test_a_batch_that_does_not_split_over_the_data_devices_names_both():
  config = config_lib.resolve('smoke', ['--config.train.batch_size=3'])
  message = one_line_error(config, num_devices=2)
  assert message.startswith('train.batch_size=3 ')
  assert '2 data shards' in message and 'expected a multiple of 2' in message


def test_a_batch_that_does_not_split_into_micro_batches_names_both():
  config = config_lib.resolve('smoke', ['--config.train.batch_size=32',
                                        '--config.train.microbatches=3'])
  message = one_line_error(config)
  assert 'train.batch_size=32' in message and 'train.microbatches=3' in message


def test_each_micro_batch_must_split_over_the_data_shards():
  config = config_lib.resolve('smoke', ['--config.train.batch_size=24',
                                        '--config.train.microbatches=4'])
  message = one_line_error(config, num_devices=4)
  assert '4 micro-batches of 6' in message and 'expected a multiple of 16' in message
  config_lib.validate(config, num_devices=2)


def test_batch_rule_against_a_reference_on_random_sizes(rng):
  """With the default mesh (fsdp = every device) the batch splits over all devices."""
  for _ in range(50):
    b, m, n = (int(rng.integers(1, 65)), int(rng.integers(1, 5)), int(2 ** rng.integers(0, 4)))
    config = config_lib.resolve('smoke', [f'--config.train.batch_size={b}',
                                          f'--config.train.microbatches={m}'])
    ok = b % m == 0 and (b // m) % n == 0
    if ok:
      config_lib.validate(config, num_devices=n)
    else:
      assert one_line_error(config, num_devices=n).startswith(f'train.batch_size={b}')


def test_only_the_axes_of_the_batch_rule_are_data_shards():
  tensor = ['--config.mesh.ici.tensor=2']   # fsdp = the other 4 of 8 devices
  config_lib.validate(config_lib.resolve('smoke', tensor + ['--config.train.batch_size=4']),
                      num_devices=8)
  config = config_lib.resolve('smoke', tensor + ['--config.train.batch_size=6'])
  assert '4 data shards (mesh fsdp=4 on 8 devices)' in one_line_error(config, num_devices=8)
  config = config_lib.resolve('smoke', ['--config.mesh.rules.batch=data',
                                        '--config.train.batch_size=3'])
  config_lib.validate(config, num_devices=8)   # data=1: the batch is not split


def test_data_shards_multiply_dcn_and_ici():
  config = config_lib.resolve('cwm_80b', [])
  assert config_lib.batch_axes(config, 192, 24) == {'data': 3, 'fsdp': 64}
  config = config_lib.resolve('cwm_80b', ['--config.train.batch_size=96'])
  assert 'expected a multiple of 192' in one_line_error(config, num_devices=192, num_nodes=24)


def test_the_batch_must_split_over_the_processes():
  config = config_lib.resolve('smoke', ['--config.mesh.rules.batch=',
                                        '--config.train.batch_size=6'])
  message = one_line_error(config, num_devices=8, num_processes=4)
  assert 'train.batch_size=6' in message and '4 processes' in message


def test_a_mesh_that_does_not_fit_the_devices_is_an_error_up_front():
  config = config_lib.resolve('smoke', ['--config.mesh.ici.data=3'])
  assert 'this job has 8' in one_line_error(config, num_devices=8)


def test_mesh_shape_is_the_one_parallel_uses():
  assert parallel.mesh_shape is config_lib.mesh_shape and parallel.AXES == config_lib.AXES


# ----------------------------------------------------------------------------- workdir

def unwritable_dir(tmp_path) -> pathlib.Path:
  """A directory this process cannot write: a chmod 555 one, else /sys (root ignores modes)."""
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  read_only.chmod(0o555)
  for candidate in (read_only, pathlib.Path('/sys')):
    try:
      with tempfile.TemporaryFile(dir=candidate):
        pass
    except OSError:
      return candidate
  pytest.skip('no directory here that this process cannot write (root, no read-only /sys)')


def workdir_error(path, write: bool) -> str:
  with pytest.raises(ConfigError) as e:
    config_lib.check_workdir(path, write=write)
  assert '\n' not in str(e.value)
  return str(e.value)


@pytest.mark.parametrize('write', [True, False])
def test_a_workdir_that_is_a_file(tmp_path, write):
  path = tmp_path / 'run'
  path.write_text('')
  assert workdir_error(path, write) == f'workdir={path} is a file; expected a directory'


def test_a_workdir_under_a_file_cannot_be_created(tmp_path):
  (tmp_path / 'file').write_text('')
  message = workdir_error(tmp_path / 'file' / 'run', write=True)
  assert 'cannot be created' in message and f'{tmp_path / "file"} is a file' in message


def test_a_missing_workdir_is_created_for_training(tmp_path):
  path = tmp_path / 'a' / 'b'
  config_lib.check_workdir(path, write=True)
  assert path.is_dir() and not list(path.iterdir())
  config_lib.check_workdir(path, write=True)   # and an existing one is fine


def test_a_missing_workdir_cannot_be_evaluated(tmp_path):
  path = tmp_path / 'never_trained'
  assert 'does not exist' in workdir_error(path, write=False)
  assert not path.exists()


def test_a_read_only_workdir_fails_training_but_not_evaluation(tmp_path):
  path = unwritable_dir(tmp_path)
  message = workdir_error(path, write=True)
  assert message.startswith(f'workdir={path} is not writable')
  config_lib.check_workdir(path, write=False)


def test_a_workdir_in_a_read_only_directory_cannot_be_created(tmp_path):
  path = unwritable_dir(tmp_path) / 'run'
  assert workdir_error(path, write=True).startswith(f'workdir={path} cannot be created')


# ----------------------------------------------------------------------------- report.Writer

@pytest.mark.parametrize('where', ['read_only', 'under_a_file'])
def test_the_writer_on_a_workdir_it_cannot_write_warns_once_and_does_nothing(
    tmp_path, capfd, rng, where):
  if where == 'read_only':
    workdir = unwritable_dir(tmp_path)
  else:
    (tmp_path / 'file').write_text('')
    workdir = tmp_path / 'file' / 'run'
  before = sorted(os.listdir(workdir)) if workdir.is_dir() else None
  writer = report.Writer(str(workdir))
  for step in range(3):
    writer.scalars(step, {'eval/loss': float(rng.normal())})
  writer.flush()
  writer.close()
  warnings = [line for line in capfd.readouterr().err.splitlines() if 'brainscale:' in line]
  assert len(warnings) == 1 and str(workdir) in warnings[0], warnings
  assert (sorted(os.listdir(workdir)) if workdir.is_dir() else None) == before


def test_the_writer_still_writes_a_writable_workdir(tmp_path, capfd, rng):
  values = [float(v) for v in rng.normal(size=3)]
  writer = report.Writer(str(tmp_path))
  for step, v in enumerate(values):
    writer.scalars(step, {'eval/loss': v})
  writer.close()
  assert 'brainscale:' not in capfd.readouterr().err
  rows = report.read_jsonl(tmp_path / 'metrics.jsonl')
  assert all(math.isclose(rows[s]['eval/loss'], v) for s, v in enumerate(values))
