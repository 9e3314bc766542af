"""The hang watchdog on its own, in real processes: under SLURM it leaves with 124 and takes
its data workers with it; outside SLURM, where nothing would restart the run, it warns once
per stalled phase and keeps waiting."""

import os
import subprocess
import sys
import textwrap

from conftest import ROOT

# A process that starts a worker (as grain's data workers are started), then stalls in a
# `save` phase whose limit is 1 s; it prints the worker's pid first.
STALL = textwrap.dedent("""
    import multiprocessing, sys, time
    import ml_collections
    from brainscale.train import events, watchdog

    if __name__ == '__main__':
      worker = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(600,))
      worker.start()
      print(worker.pid, flush=True)
      c = ml_collections.ConfigDict({'watchdog': dict(
          enabled=True, restore_s=600, compile_s=600, step_s=0, step_factor=10.0, min_step_s=600,
          warmup_steps=2, save_s=1, eval_s=600)})
      watch = watchdog.Watchdog(c, events.open_for(sys.argv[1]), poll_s=0.1)
      watch.ready(0)
      watch.step(1)
      with watch.phase('save', 1):
        time.sleep(float(sys.argv[2]))
      watch.close()
      worker.kill()
      print('finished', flush=True)
""")


def _stall(tmp_path, seconds: float, **env) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')} | env
  return subprocess.run([sys.executable, '-c', STALL, str(tmp_path), str(seconds)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat') as f:   # a zombie has exited
    return f.read().split(')')[-1].split()[0] != 'Z'


def test_under_slurm_a_stalled_phase_exits_124_and_kills_its_workers(tmp_path):
  done = _stall(tmp_path, 30, SLURM_JOB_ID='7')
  assert done.returncode == 124, done.stderr[-2000:]
  assert 'brainscale: hang: no progress in save for 1 s (limit 1 s) after step 1' in done.stderr
  assert 'Thread' in done.stderr and 'finished' not in done.stdout   # the stacks, no finish
  assert not _alive(int(done.stdout.split()[0]))


def test_outside_slurm_a_stalled_phase_warns_once_and_the_run_goes_on(tmp_path):
  done = _stall(tmp_path, 3)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'finished' in done.stdout
  warnings = [line for line in done.stderr.splitlines() if line.startswith('brainscale: ')]
  assert warnings == ['brainscale: warning: no progress in save for 1 s (limit 1 s) after '
                      "step 1; every thread's stack is above; not a SLURM job, so nothing "
                      'would restart it: still waiting (watchdog.save_s sets the limit)'], warnings
