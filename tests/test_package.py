"""brainscale as an installed package (pyproject.toml): no sys.path edits, the `brainscale`
command, the pinned versions of requirements.txt, and a clean `ruff check .`."""

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

from conftest import ROOT

PACKAGES = ('brainscale', 'kernels', 'launch', 'experiments', 'benchmarks')


def brainscale_cli(*args, cwd) -> subprocess.CompletedProcess:
  """The `brainscale` console script of this venv, with one CPU device."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  command = pathlib.Path(sys.executable).parent / 'brainscale'
  assert command.is_file(), f'{command} is missing; pip install -e . (make does it)'
  return subprocess.run([str(command), *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_no_source_edits_sys_path():
  found = [f'{path.relative_to(ROOT)}:{i}'
           for package in PACKAGES for path in sorted((ROOT / package).rglob('*.py'))
           for i, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r'\bsys\.path\b', line)]
  assert not found, f'sys.path edits (import the installed packages instead): {found}'


def test_the_brainscale_command_describes_from_any_folder(tmp_path):
  result = brainscale_cli('--experiment=smoke', '--mode=describe', '--config.model.layers=3',
                          cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'^params: ', result.stdout, re.M), result.stdout[-3000:]
  assert re.search(r'^blocks/layers/\S+ +\(3, ', result.stdout, re.M), 'the override made 3 layers'


def test_the_brainscale_command_trains_from_any_folder(tmp_path):
  result = brainscale_cli('--experiment=smoke', f'--workdir={tmp_path / "run"}',
                          '--config.train.steps=4', '--config.checkpoint.every_steps=2',
                          '--config.train.log_every=2', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == ['2', '4']


def test_the_brainscale_command_exits_2_on_a_bad_override(tmp_path):
  result = brainscale_cli('--experiment=smoke', '--config.train.stpes=3', cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'brainscale: --config.train.stpes is not a key of this experiment; did you mean '
      'train.steps'), result.stderr[-3000:]


def test_ruff_check_passes():
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache',
                           '--output-format=concise', '.'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_the_installed_packages_are_the_pinned_ones():
  """Every `name==version` of requirements.txt is what this environment has: a stale .venv,
  or a pin that another install moved (ml-dtypes 0.7.0 costs every process that imports JAX
  0.65 s of CPU: benchmarks/RESULTS.md, "seventh session"), shows here."""
  pins = [line.split('#')[0].strip().split('==')
          for line in (ROOT / 'requirements.txt').read_text().splitlines()
          if line.split('#')[0].strip()]
  assert all(len(pin) == 2 for pin in pins), f'requirements.txt: unpinned lines {pins}'
  found = {}
  for name, version in pins:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  moved = {name: (version, found[name]) for name, version in pins if found[name] != version}
  assert not moved, f'(pinned, installed): {moved}; run make (pip install -r requirements.txt)'
