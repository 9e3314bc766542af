"""launch/slurm.py: the sbatch script `--submit` writes, and a real job on a local SLURM cluster.

The script tests need no SLURM. `local_slurm` (importable with `start_local_slurm`) starts
launch/local_slurm for the session; it skips where SLURM is not installed, and fails
instead under BRAINSCALE_REQUIRE_SLURM=1 (as CI sets).
"""

import contextlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from brainscale import config as config_lib
from brainscale.train.checkpoint import Checkpoints
from conftest import ROOT, xla_flags
from experiments import base
from launch import slurm

LOCAL_SLURM = ROOT / 'launch' / 'local_slurm'
ENDED = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY',
         'PREEMPTED', 'BOOT_FAIL', 'DEADLINE'}


def submit_cli(*args, bin_dir: pathlib.Path) -> subprocess.CompletedProcess:
  """launch/run.py --submit with PATH = bin_dir only (no sbatch unless put there)."""
  env = dict(os.environ, PATH=str(bin_dir))
  return subprocess.run([sys.executable, '-X', 'importtime', 'launch/run.py', '--submit', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def sbatch_options(text: str) -> list[str]:
  return re.findall(r'^#SBATCH (\S+)$', text, re.M)


def srun_line(text: str) -> list[str]:
  """The srun command, without its stderr redirection (srun's own lines, for the campaign)."""
  line = next(line for line in text.splitlines() if line.startswith('srun '))
  command, _, redirect = line.rpartition(' 2>')
  assert redirect.startswith('"') and '/logs/srun-' in redirect
  return shlex.split(command)


def bash_syntax_ok(path: pathlib.Path):
  done = subprocess.run(['bash', '-n', str(path)], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr


def task_xla_flags(text: str, submitted: str) -> list[str]:
  """The XLA_FLAGS a task of this script gets, submitted from a shell whose XLA_FLAGS is
  `submitted`: the script's export lines, run by bash."""
  exports = [line for line in text.replace('\\\n', '').splitlines()
             if line.startswith('export XLA_FLAGS=')]
  assert len(exports) == 1, exports
  done = subprocess.run(['bash', '-c', f'{exports[0]}; printf %s "$XLA_FLAGS"'],
                        env=dict(os.environ, XLA_FLAGS=submitted), capture_output=True,
                        text=True, check=True)
  return done.stdout.split()


# --- the script, without SLURM -----------------------------------------------------------


@pytest.mark.slow
def test_train_and_submit_default_to_runs_in_the_current_folder(tmp_path):
  """From another folder, train and --submit both use runs/NAME there (config.default_workdir)."""
  elsewhere, bin_dir = tmp_path / 'elsewhere', tmp_path / 'bin'
  elsewhere.mkdir()
  bin_dir.mkdir()
  tiny = ['--config.train.steps=1', '--config.model.layers=1', '--config.train.batch_size=8',
          '--config.train.eval_batches=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1))
  trained = subprocess.run([sys.executable, str(ROOT / 'launch' / 'run.py'), '--experiment=smoke',
                            *tiny], cwd=elsewhere, env=env, capture_output=True, text=True,
                           timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert (elsewhere / 'runs' / 'smoke' / 'metrics.jsonl').is_file()

  submitted = subprocess.run([sys.executable, str(ROOT / 'launch' / 'run.py'), '--submit',
                              '--experiment=cwm_80b'], cwd=elsewhere,
                             env=dict(os.environ, PATH=str(bin_dir)), capture_output=True,
                             text=True, timeout=120)
  assert submitted.returncode == 0, submitted.stderr[-3000:]
  *script, last = submitted.stdout.splitlines()
  assert last == f'sbatch not found; wrote {elsewhere / "runs" / "cwm_80b" / "slurm"}/' + \
      pathlib.Path(last).name
  assert f'--workdir={elsewhere / "runs" / "cwm_80b"}' in srun_line('\n'.join(script))


def test_submit_without_sbatch_prints_and_writes_the_cwm_80b_script(tmp_path):
  workdir, bin_dir = tmp_path / 'w', tmp_path / 'bin'
  bin_dir.mkdir()
  overrides = ['--config.train.steps=7', '--config.data.directory=/data/my videos',
               "--config.cluster.partition=gpu", "--config.model.attention=it's"]
  done = submit_cli('--experiment=cwm_80b', f'--workdir={workdir}', *overrides, bin_dir=bin_dir)
  assert done.returncode == 0, done.stderr[-3000:]

  *printed, last = done.stdout.splitlines()
  path = pathlib.Path(last.removeprefix('sbatch not found; wrote '))
  assert last.startswith('sbatch not found; wrote ') and path.parent == workdir / 'slurm'
  assert re.fullmatch(r'cwm_80b-\d{8}-\d{6}\.sbatch', path.name)
  text = path.read_text()
  assert '\n'.join(printed) + '\n' == text
  bash_syntax_ok(path)

  options = sbatch_options(text)
  assert options[:5] == ['--job-name=brainscale-cwm_80b', '--nodes=24', '--ntasks-per-node=8',
                         '--gres=gpu:8', '--time=30-00:00:00']
  assert {'--partition=gpu', '--requeue', '--signal=TERM@300', '--open-mode=append',
          f'--output={workdir}/logs/slurm-%j.out'} <= set(options)
  assert not any(o.startswith(('--account', '--qos', '--cpus-per-task')) for o in options)
  assert '--gpus-per-task' not in text and 'JAX_PLATFORMS' not in text
  lines = text.splitlines()
  assert lines[0] == '#!/bin/bash'
  # sbatch reads #SBATCH lines only up to the first command
  assert all(line.startswith('#SBATCH') for line in lines[1:len(options) + 1])
  assert f'export BRAINSCALE_RUN_ID={path.stem}' in lines
  # the submitting shell's XLA_FLAGS first, then the job's own (XLA keeps a flag's last value)
  flags = task_xla_flags(text, '--xla_dump_to=/scratch/hlo --xla_gpu_enable_triton_gemm=true')
  assert flags[:2] == ['--xla_dump_to=/scratch/hlo', '--xla_gpu_enable_triton_gemm=true']
  assert flags[2] == '--xla_gpu_enable_latency_hiding_scheduler=true'
  assert flags[-1] == '--xla_gpu_nccl_terminate_on_error=true'   # an NCCL error ends the process
  assert flags.index('--xla_gpu_enable_triton_gemm=false') > 1   # the job's value wins
  assert task_xla_flags(text, '')[0] == '--xla_gpu_enable_latency_hiding_scheduler=true'

  srun = srun_line(text)
  assert srun[:2] == ['srun', '--kill-on-bad-exit=1']
  assert srun[-len(overrides) - 4:] == [sys.executable, str(ROOT / 'launch' / 'run.py'),
                                        '--experiment=cwm_80b', f'--workdir={workdir}', *overrides]
  assert not re.search(r'^import time:.*\|\s+jax(\.|$)', done.stderr, re.M)  # submit imports no JAX


def test_submit_of_an_experiment_without_a_cluster_section_fails_in_one_line(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  done = subprocess.run([sys.executable, 'launch/run.py', '--experiment=smoke', '--submit',
                         f'--workdir={tmp_path / "w"}'], cwd=ROOT,
                        env=dict(os.environ, PATH=str(bin_dir)), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2
  assert done.stderr.count('\n') == 1 and done.stdout == ''
  message = done.stderr.strip()
  assert message.startswith('brainscale: --submit needs a cluster section')
  assert 'smoke' in message and 'cwm_80b' in message and 'enigma_1b' in message
  assert not (tmp_path / 'w').exists()


def test_a_cpu_cluster_asks_for_no_gpus_and_gives_each_cpu_a_jax_device(tmp_path, rng):
  nodes, cpus, grace = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(30, 900))
  overrides = ['--config.cluster.gpus_per_node=0', f'--config.cluster.nodes={nodes}',
               f'--config.cluster.cpus_per_task={cpus}', f'--config.cluster.grace_s={grace}',
               '--config.cluster.qos=low', '--config.cluster.account=lab']
  config = config_lib.resolve('cwm_80b', overrides)
  path = tmp_path / 'job.sbatch'
  path.write_text(slurm.script(config, workdir=tmp_path, overrides=overrides, run_id='r-1'))
  bash_syntax_ok(path)
  text = path.read_text()
  options = sbatch_options(text)
  assert {f'--nodes={nodes}', '--ntasks-per-node=1', f'--cpus-per-task={cpus}', '--qos=low',
          '--account=lab', f'--signal=TERM@{grace}'} <= set(options)
  assert not any(o.startswith(('--gres', '--partition')) for o in options)
  assert 'export JAX_PLATFORMS=cpu' in text.splitlines()
  # a count the submitting shell set gives way to the job's; its other flags reach the task
  flags = task_xla_flags(text, '--xla_backend_optimization_level=1 '
                               '--xla_force_host_platform_device_count=8')
  assert flags == ['--xla_backend_optimization_level=1',
                   '--xla_force_host_platform_device_count=8',
                   f'--xla_force_host_platform_device_count={cpus}']
  devices = subprocess.run([sys.executable, '-c', 'import jax; print(jax.device_count())'],
                           env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(flags)),
                           capture_output=True, text=True, timeout=120, check=True)
  assert devices.stdout.strip() == str(cpus)
  assert 'NCCL' not in text and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in text
  assert f'--cpus-per-task={cpus}' in srun_line(text)  # srun of SLURM 22.05 does not inherit it


def test_requeue_exit_is_the_trainers():
  from brainscale.train import preemption  # noqa: PLC0415  (slurm.py must not import JAX)
  assert slurm.REQUEUE_EXIT == preemption.REQUEUE_EXIT


def fake_tools(bin_dir: pathlib.Path, srun_status: int):
  """srun that records its arguments and exits with srun_status; scontrol and sbatch that
  record theirs; sinfo that lists one node."""
  bin_dir.mkdir()
  for name, body in (('srun', f'echo "$@" > "$FAKE_LOG/srun"; exit {srun_status}'),
                     ('scontrol', 'echo "$@" > "$FAKE_LOG/scontrol"'),
                     ('sbatch', 'echo "$@" > "$FAKE_LOG/sbatch"; echo Submitted batch job 4243'),
                     ('sinfo', 'echo node1')):
    (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
    (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize('status', [0, 1, 2, slurm.REQUEUE_EXIT, 124, 137, 143])
def test_the_job_requeues_itself_when_preempted_and_resubmits_itself_after_a_curable_failure(
    tmp_path, status):
  """No task events here (a fake srun): 0 is done, 1 and 2 stop, 75 requeues the job, a
  hang (124) or a task killed by a signal (128 + n) queues the next attempt after it."""
  assert slurm.REQUEUE_EXIT == 75
  config = config_lib.resolve('cwm_80b', [])
  path = tmp_path / 'w' / 'slurm' / 'r-1.sbatch'
  path.parent.mkdir(parents=True)
  path.write_text(slurm.script(config, workdir=tmp_path / 'w', overrides=[], run_id='r-1'))
  fake_tools(tmp_path / 'bin', status)
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}:/usr/bin:/bin', FAKE_LOG=str(tmp_path),
             SLURM_JOB_ID='4242')
  done = subprocess.run(['bash', str(path)], env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == status, done.stderr
  assert (tmp_path / 'w' / 'logs').is_dir()
  assert '--experiment=cwm_80b' in (tmp_path / 'srun').read_text()
  requeued, resubmitted = tmp_path / 'scontrol', tmp_path / 'sbatch'
  assert requeued.exists() == (status == 75)
  if status == 75:
    assert requeued.read_text().split() == ['requeue', '4242']
  assert resubmitted.exists() == (status in (124, 137, 143))
  if resubmitted.exists():
    assert resubmitted.read_text().split() == ['--dependency=afterany:4242', str(path)]
    assert 'restart 1 of 20: no node to blame; resubmitted as job 4243' in done.stdout
  state = json.loads((tmp_path / 'w' / 'campaign.json').read_text())
  assert state['attempts'][0]['status'] == status


# --- a local SLURM cluster -------------------------------------------------------------


def start_local_slurm(state_dir, nodes: int = 1) -> dict:
  """Starts launch/local_slurm in state_dir (`nodes` slurmd: n1..nN when more than one);
  the environment whose sbatch and srun use it.

  Skips where SLURM or root is missing, or fails under BRAINSCALE_REQUIRE_SLURM=1.
  Stop it with `launch/local_slurm/stop.sh state_dir`.
  """
  missing = [t for t in ('sbatch', 'srun', 'slurmctld', 'slurmd', 'munged')
             if shutil.which(t, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin') is None]
  why = ''
  if missing:
    why = f'SLURM not installed ({", ".join(missing)} missing): apt-get install -y slurm-wlm munge'
  elif os.geteuid() != 0:
    why = 'launch/local_slurm/start.sh needs root'
  if why and os.environ.get('BRAINSCALE_REQUIRE_SLURM') == '1':
    pytest.fail(f'{why} (BRAINSCALE_REQUIRE_SLURM=1)')
  if why:
    pytest.skip(why)
  done = subprocess.run(['bash', str(LOCAL_SLURM / 'start.sh'), str(state_dir), str(nodes)],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, f'start.sh failed:\n{done.stdout}\n{done.stderr}'
  conf = re.search(r'^export SLURM_CONF=(\S+)$', done.stdout, re.M).group(1)
  path = os.environ.get('PATH', '') + ':/usr/sbin:/sbin'
  return dict(os.environ, SLURM_CONF=conf, PATH=path)


def stop_local_slurm(state_dir, check: bool = True) -> None:
  """launch/local_slurm/stop.sh state_dir; fails if it does (unless not `check`: cleanup)."""
  subprocess.run(['bash', str(LOCAL_SLURM / 'stop.sh'), str(state_dir)], check=check,
                 capture_output=True, timeout=180)


@contextlib.contextmanager
def local_slurm_states(count: int = 1, prefix: str = 'brainscale-slurm-'):
  """`count` new state folders for start_local_slurm (not under pytest's private tmp, which
  user slurm cannot enter), each stopped with stop.sh and removed at the end."""
  states = [tempfile.mkdtemp(prefix=prefix) for _ in range(count)]
  try:
    yield states
  finally:
    for state in states:
      stop_local_slurm(state, check=False)
      shutil.rmtree(state, ignore_errors=True)


def sbatch_wrap(env: dict, output: pathlib.Path, command: str) -> int:
  """`sbatch --wrap=COMMAND` writing to `output`; its job id."""
  done = subprocess.run(['sbatch', '--parsable', f'--output={output}', f'--wrap={command}'],
                        env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  return int(done.stdout.strip().split(';')[0])


@pytest.fixture(scope='session')
def local_slurm():
  """A one-node SLURM cluster for the session: yields the environment to run sbatch in."""
  with local_slurm_states() as (state,):
    yield start_local_slurm(state)


def wait_for(job: int, env: dict, timeout_s: float = 300) -> str:
  """The job's final JobState, polled with scontrol."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    shown = subprocess.run(['scontrol', 'show', 'job', str(job)], env=env, capture_output=True,
                           text=True).stdout
    state = re.search(r'JobState=(\w+)', shown)
    if state and state.group(1) in ENDED:
      return state.group(1)
    time.sleep(1)
  subprocess.run(['scancel', str(job)], env=env)
  pytest.fail(f'job {job} did not end within {timeout_s} s')


@pytest.mark.slow
def test_stopping_one_local_cluster_leaves_another_working(tmp_path):
  """munged is one per host: stop.sh of the cluster that started it (A, when no other
  cluster runs) must leave it to B, which still runs jobs; the last one out stops it."""
  with local_slurm_states(2) as (a, b):
    start_local_slurm(a)
    b_env = start_local_slurm(b)
    stop_local_slurm(a)
    job = sbatch_wrap(b_env, tmp_path / 'job.out', 'echo alive')
    assert wait_for(job, b_env, timeout_s=120) == 'COMPLETED'
    assert (tmp_path / 'job.out').read_text().strip() == 'alive'


@pytest.mark.slow
def test_a_second_stop_spares_the_cluster_on_its_ports_and_the_process_on_its_pid(tmp_path):
  """stop.sh of a cluster already stopped (a second cleanup; a daemon killed with its pid
  file left behind) stops nothing: its ports are taken by the next cluster to start (B here,
  with a job running) and its pids by other processes. In CI a test's second stop of its
  first cluster once cancelled every job of the cluster that had taken its ports."""
  bystander = subprocess.Popen(['sleep', '600'])
  try:
    with local_slurm_states(2) as (a, b):
      start_local_slurm(a)
      stop_local_slurm(a)
      b_env = start_local_slurm(b)   # the lowest free ports: the ones A had
      job = sbatch_wrap(b_env, tmp_path / 'job.out', 'sleep 8; echo alive')
      pathlib.Path(a, 'slurmctld.pid').write_text(f'{bystander.pid}\n')   # a reused pid
      stop_local_slurm(a)
      assert wait_for(job, b_env, timeout_s=120) == 'COMPLETED'
      assert bystander.poll() is None, 'stop.sh killed a process that is not its slurmctld'
      assert (tmp_path / 'job.out').read_text().strip() == 'alive'
  finally:
    bystander.kill()


def job_logs(workdir: pathlib.Path) -> str:
  return '\n'.join(f'== {p.name}\n{p.read_text()[-3000:]}' for p in sorted(workdir.glob('logs/*')))


@pytest.mark.slow
def test_smoke_trains_as_a_two_task_cpu_job_on_local_slurm(local_slurm, tmp_path, monkeypatch):
  for key in ('SLURM_CONF', 'PATH'):
    monkeypatch.setenv(key, local_slurm[key])
  overrides = ['--config.train.steps=30', '--config.checkpoint.every_steps=10',
               '--config.mesh.ici.fsdp=-1']
  config = config_lib.resolve('smoke', overrides)
  config.unlock()  # smoke has no cluster section: give it a CPU one of 2 tasks x 2 CPUs
  config.cluster = base.cluster(nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=2,
                                time_limit='00:10:00')
  job = slurm.submit(config, workdir=str(tmp_path), overrides=overrides)
  assert isinstance(job, int)

  state = wait_for(job, local_slurm)
  assert state == 'COMPLETED', job_logs(tmp_path)
  logs = [tmp_path / 'logs' / f'{job}-{rank}.log' for rank in (0, 1)]
  assert all(log.exists() for log in logs), job_logs(tmp_path)
  assert 'on 4 cpu devices, 2 process(es)' in logs[0].read_text()
  metrics = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert max(json.loads(line)['step'] for line in metrics) == 30
  assert Checkpoints(str(tmp_path), keep=3, async_save=False).steps() == [10, 20, 30]


def _smoke_job(workdir: pathlib.Path, overrides: list[str]) -> int:
  config = config_lib.resolve('smoke', overrides)
  config.unlock()
  config.cluster = base.cluster(nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=2,
                                time_limit='00:15:00')
  return slurm.submit(config, workdir=str(workdir), overrides=overrides)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return {}
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


@pytest.mark.slow
def test_sigterm_to_a_two_task_job_saves_at_one_step_requeues_and_resumes(
    local_slurm, tmp_path, monkeypatch):
  """scancel --signal=TERM mid-run: both processes stop at one agreed step, checkpoint it,
  exit 75; the script requeues the job, which resumes there and ends as an uninterrupted run."""
  for key in ('SLURM_CONF', 'PATH'):
    monkeypatch.setenv(key, local_slurm[key])
  steps = 120
  overrides = [f'--config.train.steps={steps}', '--config.checkpoint.every_steps=1000',
               '--config.train.log_every=1', '--config.mesh.ici.fsdp=-1',
               '--config.data.workers=1']   # a Grain worker, which SLURM signals too
  reference, preempted = tmp_path / 'reference', tmp_path / 'preempted'
  reference_job = _smoke_job(reference, overrides)
  job = _smoke_job(preempted, overrides)

  deadline = time.monotonic() + 240
  while max(_losses(preempted) or [0]) < 10:
    assert time.monotonic() < deadline, job_logs(preempted)
    time.sleep(0.2)
  subprocess.run(['scancel', '--signal=TERM', str(job)], env=local_slurm, check=True)

  assert wait_for(job, local_slurm, timeout_s=420) == 'COMPLETED', job_logs(preempted)
  assert wait_for(reference_job, local_slurm) == 'COMPLETED', job_logs(reference)
  logs = [(preempted / 'logs' / f'{job}-{rank}.log').read_text() for rank in (0, 1)]
  agreed = [re.findall(r'preempted: checkpoint of step (\d+) saved', log) for log in logs]
  assert len(agreed[0]) == 1 and agreed[0] == agreed[1], job_logs(preempted)   # one step, both
  stopped = int(agreed[0][0])
  assert f'stopped at the agreed step {stopped}; checkpoint saved' in logs[0]
  assert 10 <= stopped < steps
  assert f'resuming from step {stopped}' in logs[0]
  assert Checkpoints(str(preempted), keep=3, async_save=False).steps() == [stopped, steps]
  shown = subprocess.run(['scontrol', 'show', 'job', str(job)], env=local_slurm,
                         capture_output=True, text=True).stdout
  assert re.search(r'Restarts=1\b', shown), shown
  run_lines = re.findall(r'^run (smoke-\S+), SLURM job (\d+), restart (\d)$', logs[0], re.M)
  assert [(job_id, restart) for _, job_id, restart in run_lines] == [(str(job), '0'),
                                                                      (str(job), '1')]
  assert len({run_id for run_id, _, _ in run_lines}) == 1   # the run id survives the requeue
  got, expected = _losses(preempted), _losses(reference)
  assert sorted(got) == list(range(1, steps + 1)) == sorted(expected)
  assert got[steps] == pytest.approx(expected[steps], rel=1e-6, abs=1e-7)
