"""The unattended campaign: faults a long run meets, each recovered from without a human.

On a real local SLURM cluster of two nodes (launch/local_slurm, one for the module),
smoke jobs of 2 tasks meet real faults: a task killed with SIGKILL, a task stopped with
SIGSTOP, a task that hangs alive (BRAINSCALE_FAULT), a task that dies at every start.
All jobs are submitted at once and run side by side; each test then waits for its run.
Each failed attempt is followed by a new job (launch/campaign.py), so a run is followed
through WORKDIR/campaign.json and it is the run, across its jobs, that must complete.
The policy's rules without SLURM are tested at the end.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from brainscale import config as config_lib
from brainscale.train import events as events_lib
from brainscale.train import goodput, watchdog
from conftest import ROOT
from experiments import base
from launch import campaign, slurm
from test_slurm import local_slurm_states, start_local_slurm

STEPS, EVERY, FAULT_STEP = 30, 10, 15
HEARTBEAT_S, MIN_STEP_S = 20, 40   # small, yet not so small that a loaded 2-core machine trips
# them; the heartbeat first, as in production (60 s, 120 s): a frozen process is then named by
# JAX, not taken for the hang of the one that waits for it
COMMON = [f'--config.train.steps={STEPS}', f'--config.checkpoint.every_steps={EVERY}',
          '--config.train.log_every=1', '--config.mesh.ici.fsdp=-1',
          f'--config.mesh.heartbeat_timeout_s={HEARTBEAT_S}',
          f'--config.watchdog.min_step_s={MIN_STEP_S}', '--config.watchdog.warmup_steps=5']
TWO_NODES = ['--config.mesh.dcn.data=2']   # one task on each node: two hosts to the mesh
RUNS_END_S = 900   # every run ends within this long of their common submission (~5 min in CI)
runs_deadline = 0.0   # time.monotonic() by which they have (the `runs` fixture sets it)


@pytest.fixture(scope='module')
def cluster():
  """A two-node SLURM cluster (n1, n2) for the module."""
  with local_slurm_states(prefix='brainscale-campaign-') as (state_dir,):
    yield start_local_slurm(state_dir, nodes=2)


def submit(workdir: pathlib.Path, env: dict, *, nodes: int, fault: str = '',
           **cluster) -> int:
  """A smoke run of 2 tasks (nodes x 2 // nodes) submitted with `env` (+ BRAINSCALE_FAULT)."""
  overrides = COMMON + (TWO_NODES if nodes == 2 else [])
  config = config_lib.resolve('smoke', overrides)
  config.unlock()
  config.cluster = base.cluster(nodes=nodes, gpus_per_node=0, tasks_per_node=2 // nodes,
                                cpus_per_task=2, time_limit='00:20:00', **cluster)
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(env, **({watchdog.FAULT: fault} if fault else {}))
  try:
    return slurm.submit(config, workdir=str(workdir), overrides=overrides)
  finally:
    os.environ.clear()
    os.environ.update(saved)


def first_events(workdir: pathlib.Path, rank: int) -> list[dict]:
  """The events of `rank` in the run's first attempt (its job id is the lowest)."""
  files = sorted((workdir / 'events').glob(f'*-{rank}.jsonl'),
                 key=lambda p: float(p.stem.rpartition('-')[0]))
  return events_lib.read(files[0]) if files else []


def signal_at_step(workdir: pathlib.Path, signum: int, step: int, sent: dict):
  """Sends `signum` to task 1 of the first attempt that finishes `step` (an attempt may end
  earlier on its own on a loaded machine); `sent` gets the time and that attempt."""
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    for path in sorted((workdir / 'events').glob('*-1.jsonl')):
      events = events_lib.read(path)
      if any(e['event'] == 'step' and e['step'] >= step for e in events):
        os.kill(events[0]['pid'], signum)
        sent.update(t=time.time(), attempt=path.stem.rpartition('-')[0])
        return
    time.sleep(0.05)


def signalled(runs, name: str) -> tuple[dict, dict, int]:
  """(the events of the signalled attempt by rank, the time of the signal, its index)."""
  workdir, sent = runs[0][name], runs[1][name]
  assert 'attempt' in sent, f'no attempt of {name} reached step {FAULT_STEP}'
  names = sorted(events_lib.by_attempt(workdir), key=float)
  return events_lib.by_attempt(workdir)[sent['attempt']], sent['t'], names.index(sent['attempt'])


@pytest.fixture(scope='module')
def runs(cluster, tmp_path_factory):
  """Every run of the module, submitted at once: name -> workdir."""
  root = tmp_path_factory.mktemp('campaign')
  os.chmod(root, 0o755)
  dirs = {name: root / name for name in ('reference', 'killed', 'stopped', 'hung', 'excluded',
                                         'crashloop')}
  global runs_deadline
  runs_deadline = time.monotonic() + RUNS_END_S
  submit(dirs['reference'], cluster, nodes=2)
  submit(dirs['killed'], cluster, nodes=2, max_restarts=5)
  submit(dirs['stopped'], cluster, nodes=2, max_restarts=5)
  submit(dirs['hung'], cluster, nodes=2, max_restarts=5, fault=f'hang:1:{FAULT_STEP}')
  submit(dirs['excluded'], cluster, nodes=1, max_restarts=5)
  submit(dirs['crashloop'], cluster, nodes=2, fault='die:1:start', max_restarts=3,
         max_stalled_restarts=2)
  sent = {}
  for name, signum in (('killed', signal.SIGKILL), ('stopped', signal.SIGSTOP),
                       ('excluded', signal.SIGKILL)):
    sent[name] = {}
    threading.Thread(target=signal_at_step, args=(dirs[name], signum, FAULT_STEP, sent[name]),
                     daemon=True).start()
  yield dirs, sent


def job_logs(workdir: pathlib.Path) -> str:
  return '\n'.join(f'== {p.name}\n{p.read_text(errors="replace")[-2500:]}'
                   for p in sorted(workdir.glob('logs/*')))


def wait_for_run(workdir: pathlib.Path) -> dict:
  """campaign.json once the run's last attempt has ended in done or a stop. The runs run side
  by side, so one deadline holds for all: a fault that stalls them all costs RUNS_END_S once,
  not once per test."""
  while time.monotonic() < runs_deadline:
    try:
      state = campaign.load_state(workdir)
    except (json.JSONDecodeError, OSError):
      state = {'attempts': []}
    last = state['attempts'][-1] if state['attempts'] else {}
    if last.get('action') == 'done' or last.get('action', '').startswith('stopped'):
      return state
    time.sleep(1)
  pytest.fail(f'the run in {workdir} did not end within {RUNS_END_S} s of its submission\n'
              f'{job_logs(workdir)}')


def job_state(job: str, env: dict, timeout_s: float = 120) -> dict:
  """scontrol's fields of `job` once it has ended."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    shown = subprocess.run(['scontrol', 'show', 'job', job], env=env, capture_output=True,
                           text=True).stdout
    fields = dict(re.findall(r'(\w+)=(\S*)', shown))
    if fields.get('JobState') not in (None, 'PENDING', 'RUNNING', 'COMPLETING'):
      return fields
    time.sleep(1)
  pytest.fail(f'job {job} did not end: {shown}')


def losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def campaign_lines(workdir: pathlib.Path) -> list[str]:
  """The campaign's lines of every job of the run, in job order."""
  outs = sorted(workdir.glob('logs/slurm-*.out'), key=lambda p: int(p.stem.split('-')[1]))
  return [line for p in outs
          for line in p.read_text().splitlines() if line.startswith('brainscale campaign:')]


def assert_recovered(name: str, runs, cluster) -> dict:
  """The run restarted at least once, its last job COMPLETED, and it trained every step
  to the reference's losses."""
  dirs, _ = runs
  state = wait_for_run(dirs[name])
  wait_for_run(dirs['reference'])
  assert state['attempts'][-1]['action'] == 'done', job_logs(dirs[name])
  assert state['restarts'] >= 1 and len(state['attempts']) == state['restarts'] + 1
  assert job_state(state['attempts'][-1]['job'], cluster)['JobState'] == 'COMPLETED'
  first = job_state(state['attempts'][0]['job'], cluster)
  assert first['JobState'] == 'FAILED', first
  got, expected = losses(dirs[name]), losses(dirs['reference'])
  assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
  assert got[STEPS] == pytest.approx(expected[STEPS], rel=1e-6, abs=1e-7)
  return state


@pytest.mark.slow
def test_a_task_killed_mid_run_is_restarted_and_the_run_completes(runs, cluster):
  state = assert_recovered('killed', runs, cluster)
  _, _, index = signalled(runs, 'killed')
  line = campaign_lines(runs[0]['killed'])[index]
  assert 'task 1 on n2 after step' in line and 'Killed, no exit recorded' in line, line
  assert 'node n2 kept' in line, line   # 2 nodes, both needed
  assert state['excluded'] == []


@pytest.mark.slow
def test_goodput_accounts_the_steps_redone_after_the_kill_and_sums_to_the_wall_time(runs):
  workdir = runs[0]['killed']
  wait_for_run(workdir)
  killed, _, index = signalled(runs, 'killed')
  last_dispatched = max(e['step'] for e in killed['0'] if e['event'] in ('step', 'compile'))
  assert last_dispatched >= FAULT_STEP
  names = sorted(events_lib.by_attempt(workdir), key=float)
  resumed = [e['step'] for e in events_lib.by_attempt(workdir)[names[index + 1]]['0']
             if e['event'] == 'ready']
  assert resumed == [EVERY]   # the newest checkpoint before the kill
  account = goodput.account(workdir)
  assert set(range(EVERY + 1, last_dispatched + 1)) <= set(account['redone_steps'])
  if len(names) == 2:   # no other interruption (a loaded machine may add one)
    assert account['redone_steps'] == list(range(EVERY + 1, last_dispatched + 1))
  assert account['productive_s'] + sum(account['lost_s'].values()) == pytest.approx(
      account['wall_s'], abs=1e-6)
  assert account['interruptions'] == len(names) - 1 >= 1

  done = subprocess.run([sys.executable, '-X', 'importtime', 'launch/run.py', '--mode=goodput',
                         f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'{EVERY + 1}-{last_dispatched}' in done.stdout
  assert re.search(r'^goodput: \d+\.\d\d%$', done.stdout, re.M), done.stdout
  assert not re.search(r'^import time:.*\|\s+jax(\.|$)', done.stderr, re.M)  # no JAX


@pytest.mark.slow
def test_a_stopped_task_is_found_by_the_heartbeat_and_the_run_completes(runs, cluster):
  assert_recovered('stopped', runs, cluster)
  stopped, stopped_at, index = signalled(runs, 'stopped')
  line = campaign_lines(runs[0]['stopped'])[index]
  assert 'task 1 on n2' in line, line   # JAX named the silent task; its node is blamed
  ended = [e['t'] for e in stopped['batch'] if e['event'] == 'job_end']
  assert ended and ended[0] - stopped_at < HEARTBEAT_S + 60   # the heartbeat, not 100 s


@pytest.mark.slow
def test_a_task_that_hangs_alive_is_caught_by_its_watchdog_and_the_run_completes(runs, cluster):
  assert_recovered('hung', runs, cluster)
  events = first_events(runs[0]['hung'], 1)   # the fault is injected in the first attempt only
  fault = next(e for e in events if e['event'] == 'fault')
  limit = next(e for e in events if e['event'] == 'step_limit')['seconds']
  exit_ = next(e for e in events if e['event'] == 'exit')
  assert fault['step'] == FAULT_STEP and exit_['cause'] == 'hang' and exit_['code'] == 124
  assert limit >= MIN_STEP_S
  assert exit_['t'] - fault['t'] <= limit + HEARTBEAT_S   # the configured limit + heartbeat
  first_job = campaign.load_state(runs[0]['hung'])['attempts'][0]['job']
  log = (runs[0]['hung'] / 'logs' / f'{first_job}-1.log').read_text()
  assert 'Thread 0x' in log and 'in _inject' in log   # every thread's stack, the stuck one too
  line = campaign_lines(runs[0]['hung'])[0]
  assert f'task 1 on n2 after step {FAULT_STEP}: exit 124 (hang)' in line, line


@pytest.mark.slow
def test_the_node_of_a_killed_task_is_left_out_and_the_next_job_runs_elsewhere(runs, cluster):
  workdir = runs[0]['excluded']
  state = wait_for_run(workdir)
  assert state['attempts'][-1]['action'] == 'done', job_logs(workdir)
  killed, _, index = signalled(runs, 'excluded')
  failed_node = killed['1'][0]['node']
  other = {'n1': 'n2', 'n2': 'n1'}[failed_node]
  line = campaign_lines(workdir)[index]
  assert f'node {failed_node} excluded' in line and f'--exclude={failed_node}' in line, line
  next_job = state['attempts'][index + 1]['job']
  shown = job_state(next_job, cluster)
  assert shown['ExcNodeList'] == failed_node and shown['NodeList'] == other, shown
  after = events_lib.by_attempt(workdir)[f'{next_job}.0']
  assert {after[rank][0]['node'] for rank in ('0', '1')} == {other}
  assert job_state(state['attempts'][-1]['job'], cluster)['JobState'] == 'COMPLETED'
  assert max(losses(workdir)) == STEPS


@pytest.mark.slow
def test_a_fault_at_every_start_stops_after_k_restarts_without_progress(runs, cluster):
  workdir = runs[0]['crashloop']
  state = wait_for_run(workdir)
  assert state['attempts'][-1]['action'] == 'stopped: no progress', job_logs(workdir)
  assert state['restarts'] == 2 == len(state['attempts']) - 1   # K = 2, within the budget 3
  for attempt in state['attempts']:
    assert job_state(attempt['job'], cluster)['JobState'] == 'FAILED'
  stops = [line for line in campaign_lines(workdir) if 'stopped' in line]
  assert len(stops) == 1 and stops[0] == campaign_lines(workdir)[-1]
  assert '2 restarts in a row made no new checkpoint' in stops[0]
  assert 'task 0 on n1' in stops[0] and 'task 1 on n2' in stops[0]   # each task's last error
  last_out = workdir / 'logs' / f'slurm-{state["attempts"][-1]["job"]}.out'
  assert stops[0] in last_out.read_text()


# --- the policy's rules, without SLURM ------------------------------------------------------


def test_the_exclusion_list_is_bounded_and_never_leaves_the_job_too_few_nodes():
  nodes = [f'n{i}' for i in range(1, 7)]
  add = lambda excluded, node, job_nodes=2, most=3: campaign.exclusion(
      excluded, node, max_excluded=most, job_nodes=job_nodes, available=nodes)
  assert add([], 'n3') == ['n3']
  assert add(['n1', 'n2', 'n3'], 'n4') == ['n2', 'n3', 'n4']      # the oldest goes first
  assert add(['n1', 'n2'], 'n1') == ['n2', 'n1']                  # once, as the newest
  assert add(['n1', 'n2', 'n3'], 'n4', job_nodes=4) == ['n3', 'n4']   # 6 - 4 = 2 to spare
  assert add(['n1'], 'n2', job_nodes=6) == []                     # needs every node
  assert campaign.exclusion([], 'n1', max_excluded=4, job_nodes=1, available=['n1']) == []
  assert add(['gone'], '') == []                                  # nodes no longer there


def fake_slurm(bin_dir: pathlib.Path, log: pathlib.Path, nodes: str):
  """sbatch, scontrol and sinfo that record their arguments; sinfo lists `nodes`."""
  bin_dir.mkdir()
  tools = {'sbatch': f'echo "sbatch $@" >> {log}; echo "Submitted batch job 99"',
           'scontrol': f'echo "scontrol $@" >> {log}',
           'sinfo': f'printf "%s\\n" {nodes}'}
  for name, body in tools.items():
    (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
    (bin_dir / name).chmod(0o755)


def attempt(workdir, monkeypatch, job: int, tasks: dict, *, status: int, checkpoint=None,
            **limits) -> tuple[int, str]:
  """One attempt of job `job`: begin, each task's events ({rank: (node, last step, exit
  code or None, cause)}), a checkpoint, end; (its exit status, its campaign line)."""
  monkeypatch.setenv('SLURM_JOB_ID', str(job))
  monkeypatch.setenv('SLURM_RESTART_COUNT', '0')
  monkeypatch.setenv('SLURM_NTASKS', str(len(tasks)))
  monkeypatch.setenv('SLURM_JOB_NUM_NODES', '1')
  campaign.begin(workdir)
  for rank, (node, step, code, cause) in tasks.items():
    events = events_lib.Events(workdir, rank)
    events.record('start', rank=rank, node=node)
    events.record('step', step=step)
    if code is not None:
      events.record('exit', code=code, cause=cause, message=f'{cause} on {rank}')
  if checkpoint is not None:
    (pathlib.Path(workdir) / 'checkpoints' / str(checkpoint)).mkdir(parents=True, exist_ok=True)
  args = ['end', f'--workdir={workdir}', '--run=r', f'--status={status}', '--script=job.sbatch',
          *[f'--{k}={v}' for k, v in limits.items()]]
  out = subprocess.run([sys.executable, '-m', 'launch.campaign', *args], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ))
  return out.returncode, out.stdout.strip()


@pytest.fixture
def policy(tmp_path, monkeypatch):
  log = tmp_path / 'calls'
  fake_slurm(tmp_path / 'bin', log, 'n1 n2 n3')
  monkeypatch.setenv('PATH', f'{tmp_path / "bin"}:{os.environ["PATH"]}')
  return tmp_path / 'w', log


def test_bad_input_a_full_disk_and_a_nan_stop_the_run_without_a_restart(policy, monkeypatch):
  workdir, calls = policy
  for job, (code, cause) in enumerate([(2, 'input'), (74, 'checkpoint'), (1, 'nonfinite')]):
    status, line = attempt(workdir / str(job), monkeypatch, job,
                           {0: ('n1', 5, code, cause), 1: ('n1', 5, code, cause)}, status=code)
    assert status == code and line.startswith('brainscale campaign: stopped run r attempt 0')
    assert 'a restart would repeat it' in line and f'exit {code} ({cause})' in line
  assert not calls.exists()   # nothing submitted, nothing requeued


def test_a_preempted_attempt_requeues_and_is_not_counted(policy, monkeypatch):
  workdir, calls = policy
  status, line = attempt(workdir, monkeypatch, 7, {0: ('n1', 9, 75, 'preempted'),
                                                   1: ('n2', 9, 75, 'preempted')}, status=75)
  assert status == 75 and 'preempted' in line and 'requeued' in line
  assert calls.read_text().split() == ['scontrol', 'requeue', '7']
  assert campaign.load_state(workdir)['restarts'] == 0


def test_restarts_stop_at_the_budget_and_after_k_without_progress(policy, monkeypatch):
  workdir, calls = policy
  lost = lambda step: {0: ('n1', step, 69, 'peer_lost'), 1: ('n2', step, None, '')}
  # progress every time: only the budget (2) stops it, at the third failure
  for job, checkpoint in ((1, 10), (2, 20)):
    status, line = attempt(workdir / 'a', monkeypatch, job, lost(checkpoint + 3), status=137,
                           checkpoint=checkpoint, max_restarts=2, max_excluded=1)
    assert f'restart {job} of 2' in line and 'task 1 on n2' in line, line
    assert 'node n2 excluded; resubmitted as job 99 (--exclude=n2)' in line

  status, line = attempt(workdir / 'a', monkeypatch, 3, lost(33), status=137, checkpoint=30,
                         max_restarts=2)
  assert status == 137 and 'the restart budget is spent (2 of cluster.max_restarts=2)' in line
  assert calls.read_text().count('sbatch ') == 2
  assert all('--dependency=afterany:' in c for c in calls.read_text().splitlines())
  # no new checkpoint: the second restart in a row without one stops it (K = 2)
  lines = [attempt(workdir / 'b', monkeypatch, job, lost(5), status=137, max_stalled=2,
                   max_restarts=10)[1] for job in (11, 12, 13)]
  assert 'restart 1 of 10' in lines[0] and 'restart 2 of 10' in lines[1]
  assert lines[2].startswith('brainscale campaign: stopped run r attempt 2 (job 13): 2 '
                             'restarts in a row made no new checkpoint')
  assert 'task 0 on n1 after step 5: exit 69 (peer_lost)' in lines[2]
  assert 'task 1 on n2 after step 5: no exit recorded' in lines[2]


def test_of_two_hung_tasks_the_one_behind_is_blamed():
  hang = lambda step, t: {'code': 124, 'cause': 'hang', 'step': step, 't': t, 'waited_s': 10}
  behind = campaign.Task(1, 'n2', exit=hang(15, 100.0), last_t=100.0, last_step=15)
  waiting = campaign.Task(0, 'n1', exit=hang(16, 95.0), last_t=95.0, last_step=16)
  assert campaign.culprit([waiting, behind], srun_first=0, unhealthy=set()) is behind
  silent = campaign.Task(2, 'n3', last_t=50.0, last_step=16)
  assert campaign.culprit([waiting, silent], srun_first=None, unhealthy={2}) is silent


def test_the_young_daly_interval_is_where_the_planned_goodput_peaks(rng):
  mtbf_h, save_s, restart_s = rng.uniform(20, 500), rng.uniform(1, 120), rng.uniform(60, 3600)
  goodput_at = lambda s: goodput.expected(days=30, mtbf_h=mtbf_h, interval_s=s, save_s=save_s,
                                          restart_s=restart_s)['goodput']
  grid = [60 * 1.01 ** i for i in range(800)]
  best = max(grid, key=goodput_at)
  assert goodput.young_daly_s(save_s, mtbf_h) == pytest.approx(best, rel=0.02)
  llama3 = goodput.expected(days=30, mtbf_h=goodput.mtbf_hours(
      config_lib.load('cwm_80b').cluster, 192), interval_s=3600, save_s=0, restart_s=0)
  assert llama3['interruptions'] == pytest.approx(2.73, abs=0.01)   # 192 GPUs, 30 days


@pytest.mark.slow
def test_profile_steps_trace_the_run_once_where_tensorboard_lists_it(tmp_path):
  """train.profile_steps=4,3: a jax.profiler trace of steps 4-6 under tb/plugins/profile/RUN/
  (the layout TensorBoard's profile plugin lists), the per-kind table in the log; a rerun
  resumed past the window adds none."""
  from test_train import run_cli  # noqa: PLC0415
  args = ['--experiment=smoke', f'--workdir={tmp_path}', '--config.train.log_every=4',
          '--config.checkpoint.every_steps=6', '--config.train.profile_steps=4,3']
  done = run_cli(*args, '--config.train.steps=8')
  assert done.returncode == 0, done.stderr[-3000:]
  runs = sorted((tmp_path / 'tb' / 'plugins' / 'profile').iterdir())
  assert len(runs) == 1 and list(runs[0].glob('*.xplane.pb')), runs
  from brainscale.train import profile  # noqa: PLC0415
  assert sum(profile.trace_op_times(str(runs[0])).values()) > 0
  assert 'profiled steps 4..6 into' in done.stdout
  table = re.search(r'^profile: ([\d.]+) ms busy per step\n((?:  \S.*\n)+)', done.stdout, re.M)
  assert table and float(table.group(1)) > 0 and 'matmul' in table.group(2), done.stdout

  again = run_cli(*args, '--config.train.steps=12')   # resumes from step 8, the last
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming from step 8' in again.stdout and 'not profiling' in again.stdout
  assert sorted((tmp_path / 'tb' / 'plugins' / 'profile').iterdir()) == runs


def test_goodput_charges_each_interval_once_and_counts_redone_steps(tmp_path):
  """Two attempts written by hand: a hang of process 1 after step 4, a restart from the
  checkpoint of step 2; every second of the 100 is charged once."""
  def write(name, rank, rows):
    path = tmp_path / 'events' / f'{name}-{rank}.jsonl'
    path.parent.mkdir(exist_ok=True)
    path.write_text(''.join(json.dumps({'t': t, 'event': e, **f}) + '\n' for t, e, f in rows))
  write('1.0', 'batch', [(0, 'job_start', {}), (40, 'job_end', {})])
  write('1.0', 0, [(2, 'start', {}), (5, 'ready', {'step': 0}), (10, 'compile', {'step': 1}),
                   (11, 'step', {'step': 2, 'data_s': 0.5}),
                   (14, 'save', {'t0': 12, 'step': 2}), (15, 'step', {'step': 3}),
                   (16, 'step', {'step': 4})])
  write('1.0', 1, [(2, 'start', {}), (16, 'step', {'step': 4}),
                   (30, 'exit', {'code': 124, 'cause': 'hang', 'waited_s': 14})])
  write('2.0', 'batch', [(50, 'job_start', {}), (100, 'job_end', {})])
  write('2.0', 0, [(52, 'start', {}), (53, 'restore', {'t0': 52.5}), (54, 'ready', {'step': 2}),
                   (60, 'compile', {'step': 3}), (61, 'step', {'step': 4}),
                   (95, 'eval', {'t0': 62, 'step': 4}),
                   (99, 'exit', {'code': 0, 'cause': 'done'})])
  a = goodput.account(tmp_path)
  lost = a['lost_s']
  assert a['wall_s'] == 100 and a['attempts'] == 2 and a['interruptions'] == 1
  assert a['redone_steps'] == [3, 4] and lost['redone'] == 2   # steps 3 and 4, 1 s each
  assert a['productive_s'] == 0.5 + 1                          # step 2 (less its data wait), 4
  assert lost['hang'] == 14 and lost['teardown'] == 10 + 4 + 1 and lost['between'] == 10
  assert lost['other'] == 1 + 0.5 + 1   # before the save, the restore and the eval began
  assert lost['compile'] == 5 + 6 and lost['save'] == 2 and lost['eval'] == 33
  assert lost['launch'] == 2 + 2 and lost['init'] == 3 + 1 and lost['restore'] == 0.5
  assert a['productive_s'] + sum(lost.values()) == pytest.approx(a['wall_s'])
