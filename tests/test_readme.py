"""The README's console blocks run as written: a newcomer's first commands, tested (a doc test).

Each ```console block of README.md is a list of commands (`$ ...`), each followed by what it
prints: every line given must appear in its output (stdout and stderr), in that order; `...`
stands for any lines. A block's commands run one after another in bash, in a fresh folder of
their own, with the virtualenv's bin first on PATH (what `source .venv/bin/activate` gives
after `make run`), SLURM's commands hidden from PATH (a newcomer's machine has none) and
XLA_FLAGS holding only the tests' compile setting (conftest.xla_flags). A
command must exit 0, or with the status its trailing `# exit N` names. The files a block
reads (a Sensorium folder, an NWB file) are written into its folder first, by INPUTS.

The blocks describe the plain install (`make run`, no CUDA build): with the CUDA build the
plan compiles for GPUs and prints other lines, so there the test skips, and fails instead
under BRAINSCALE_REQUIRE_PLAIN=1, which CI's first stage sets (.ci/run). `make docs` runs it.
"""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from brainscale.data.synthetic import v1, v1_files
from brainscale.plan import gpu
from conftest import xla_flags
from neural_helpers import write_simulated_nwb

ROOT = pathlib.Path(__file__).resolve().parent.parent
SLURM_COMMANDS = ('sbatch', 'srun', 'squeue', 'scontrol', 'sinfo', 'scancel', 'salloc')
EXIT = re.compile(r'\s+#\s*exit\s+(\d+)\s*$')

pytestmark = pytest.mark.readme


@dataclasses.dataclass
class Command:
  line: str                   # as written after `$ `, its `# exit N` removed
  exit_code: int
  expected: list[str]         # lines to find in the output, in order; '...' is any lines


def console_blocks(text: str) -> list[list[Command]]:
  """The ```console blocks of a markdown text, each as its commands."""
  blocks = []
  for body in re.findall(r'^```console\n(.*?)^```', text, flags=re.M | re.S):
    commands = []
    for line in body.splitlines():
      if line.startswith('$ '):
        command = line[2:]
        code = EXIT.search(command)
        commands.append(Command(EXIT.sub('', command), int(code[1]) if code else 0, []))
      elif commands and line.strip():
        commands[-1].expected.append(line.rstrip())
    blocks.append(commands)
  return blocks


def missing_lines(expected: list[str], output: str) -> list[str]:
  """The expected lines not found, in order, among the output's lines (each a substring)."""
  lines, at, missing = output.splitlines(), 0, []
  for want in expected:
    if want.strip() == '...':
      continue
    found = next((i for i in range(at, len(lines)) if want.strip() in lines[i]), None)
    if found is None:
      missing.append(want)
    else:
      at = found + 1
  return missing


def test_the_parser_reads_commands_exit_codes_and_lines_in_order():
  text = ('x\n```console\n$ echo a   # exit 3\nline one\n...\nline two\n$ true\n```\n'
          '```\n$ not a console block\n```\n')
  [block] = console_blocks(text)
  assert [(c.line, c.exit_code, c.expected) for c in block] == [
      ('echo a', 3, ['line one', '...', 'line two']), ('true', 0, [])]
  assert missing_lines(['a', '...', 'c'], 'a\nb\nc\n') == []
  assert missing_lines(['c', 'a'], 'a\nb\nc\n') == ['a']   # in order


def path_without_slurm(tmp_path: pathlib.Path) -> str:
  """PATH with the venv's bin first and SLURM's commands left out: a folder of PATH that
  holds one is replaced by a folder of links to all its other entries."""
  parts = [str(pathlib.Path(sys.executable).parent)] + os.environ.get('PATH', '').split(':')
  result = []
  for k, part in enumerate(parts):
    folder = pathlib.Path(part)
    if not any((folder / name).exists() for name in SLURM_COMMANDS):
      result.append(part)
      continue
    shadow = tmp_path / f'path{k}'
    shadow.mkdir()
    for entry in folder.iterdir():
      if entry.name not in SLURM_COMMANDS:
        (shadow / entry.name).symlink_to(entry)
    result.append(str(shadow))
  return ':'.join(result)


def sensorium_and_nwb(folder: pathlib.Path):
  """A Sensorium 2023 mouse folder and an NWB file of simulated V1 sessions (pynwb writes the
  file), under the names the README uses."""
  spec = v1.Spec(animals=2, sessions_per_animal=1, neurons=24, train_trials=8,
                 validation_trials=2, repeat_stimuli=2, repeats=3, trial_seconds=4.0)
  v1_files.write_sensorium(folder / 'dynamic29515-10-12-Video', v1.simulate_session(spec, 0, 0))
  write_simulated_nwb(folder / 'sub-1_ses-1_ophys.nwb', v1.simulate_session(spec, 1, 0))


INPUTS = {'dynamic29515-10-12-Video': sensorium_and_nwb}
BLOCKS = console_blocks((ROOT / 'README.md').read_text())


def test_the_readme_has_the_newcomers_blocks():
  commands = [c.line for block in BLOCKS for c in block]
  for needed in ('brainscale --help', 'brainscale --experiment=cwm_80b --mode=plan',
                 'brainscale --experiment=cwm_80b --submit', '--mode=describe',
                 'brainscale.data.importers.sensorium', 'brainscale.data.importers.nwb',
                 '--config.data.root='):
    assert any(needed in c for c in commands), needed


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_a_readme_console_block_runs_as_written(index, tmp_path):
  if gpu.compiler_available():
    why = "the README's blocks show the plain install; the CUDA build of JAX is installed"
    if os.environ.get('BRAINSCALE_REQUIRE_PLAIN') == '1':
      pytest.fail(f'{why} (BRAINSCALE_REQUIRE_PLAIN=1)')
    pytest.skip(why)
  folder = tmp_path / 'newcomer'
  folder.mkdir()
  text = '\n'.join(c.line for c in BLOCKS[index])
  for name, write in INPUTS.items():
    if name in text:
      write(folder)
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  env.update(PATH=path_without_slurm(tmp_path), BRAINSCALE_DATA=str(tmp_path / 'data'),
             XLA_FLAGS=xla_flags())
  for command in BLOCKS[index]:
    done = subprocess.run(['bash', '-c', command.line], cwd=folder, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
    assert done.returncode == command.exit_code, (command.line, done.stdout[-3000:])
    missing = missing_lines(command.expected, done.stdout)
    assert not missing, (command.line, missing, done.stdout[-3000:])
