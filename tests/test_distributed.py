"""Two JAX processes (told a coordinator) train one model together, checkpoint and resume."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from brainscale.train import report
from conftest import ROOT, xla_flags

# A constant learning rate after warmup, so a run stopped at 6 and extended to 8 follows
# the same schedule as a run of 8.
COMMON = ['--experiment=smoke', '--config.train.log_every=1',
          '--config.model.compute_dtype=float32', '--config.train.warmup_steps=2',
          '--config.train.min_lr_ratio=1.0']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(args, processes: int, devices_per_process: int) -> list[subprocess.CompletedProcess]:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags(devices_per_process))
  port = free_port()
  procs = []
  for i in range(processes):
    extra = [] if processes == 1 else [
        f'--config.mesh.coordinator=127.0.0.1:{port}', f'--config.mesh.num_processes={processes}',
        f'--config.mesh.process_id={i}']
    procs.append(subprocess.Popen([sys.executable, 'launch/run.py', *args, *extra], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
  multi = tmp_path / 'multi'
  first = launch(COMMON + [f'--workdir={multi}', '--config.train.steps=6'], 2, 2)
  for p in first:
    assert p.returncode == 0, p.stderr[-3000:]
  assert 'on 4 cpu devices, 2 process(es)' in first[0].stdout
  assert 'step 6/6' not in first[1].stdout  # only process 0 reports
  data_state = sorted(os.listdir(multi / 'checkpoints' / '6' / 'data'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data_state)

  second = launch(COMMON + [f'--workdir={multi}', '--config.train.steps=8'], 2, 2)
  for p in second:
    assert p.returncode == 0, p.stderr[-3000:]
  assert 'resuming from step 6' in second[0].stdout

  single = tmp_path / 'single'
  (one,) = launch(COMMON + [f'--workdir={single}', '--config.train.steps=8'], 1, 4)
  assert one.returncode == 0, one.stderr[-3000:]
  got = report.read_jsonl(multi / 'metrics.jsonl')
  want = report.read_jsonl(single / 'metrics.jsonl')
  steps = range(1, 9)
  np.testing.assert_allclose([got[s]['train/loss'] for s in steps],
                             [want[s]['train/loss'] for s in steps], rtol=1e-5)
