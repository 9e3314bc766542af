"""`--help` and `-h` of the command lines, and the optional-dependency probes, as a newcomer meets
them: the usage names every mode and experiment, and exits 0; a missing package is an answer."""

import pathlib
import subprocess
import sys

import pytest

from brainscale import config as config_lib
from brainscale.plan import gpu
from launch import usage

ROOT = pathlib.Path(__file__).resolve().parent.parent
BRAINSCALE = pathlib.Path(sys.executable).parent / 'brainscale'


def _help(*command) -> str:
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_brainscale_help_lists_every_mode_and_experiment(flag):
  command = [str(BRAINSCALE)] if BRAINSCALE.exists() else [sys.executable, 'launch/run.py']
  text = _help(*command, flag)
  assert text.startswith('brainscale: train, evaluate, describe or plan')
  for mode, what in usage.MODES.items():
    assert f'  {mode:<9} {what}' in text
  summaries = config_lib.experiment_summaries()
  assert set(summaries) == set(config_lib.experiment_names()) and 'cwm_80b' in summaries
  lines = text.splitlines()
  for name, summary in summaries.items():
    assert summary, f'experiments/{name}.py has no docstring'
    assert any(line.split() and line.split()[0] == name and line.endswith(summary)
               for line in lines), name
  for needed in ('--workdir=DIR', '--config.KEY=VALUE', '--submit', 'examples:',
                 'brainscale --experiment=cwm_80b --mode=plan', '--experiment: experiments/'):
    assert needed in text


def test_run_py_help_is_the_same_usage():
  assert _help(sys.executable, 'launch/run.py', '-h').startswith(usage.brainscale_usage())


def test_predict_help_shows_examples_and_its_flags():
  text = _help(sys.executable, 'launch/predict.py', '--help')
  assert 'Examples (a run trained with `brainscale --experiment=cwm_tiny`)' in text
  assert text.count('python launch/predict.py --workdir=runs/cwm_tiny') >= 3
  for flag in ('--workdir:', '--video:', '--frames:', '--move:', '--points:', '--out:'):
    assert flag in text


def test_an_optional_package_that_is_absent_is_false_not_an_error():
  assert gpu.installed('json') and gpu.installed('json.decoder')
  assert not gpu.installed('brainscale_no_such_package.sub')   # the parent is missing
  assert not gpu.installed('json.no_such_module')
  assert gpu.compiler_available() in (True, False)
