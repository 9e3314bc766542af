"""The trainer through its public seams: launch/run.py, loop.train, checkpoints, reports."""

import glob
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.train import describe, loop, optim, report
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from conftest import ROOT, xla_flags


def cli_env(devices: int = 1) -> dict:
  """The environment of a single-process CLI run on `devices` CPU devices. Its compiled steps
  go to the run's shared JAX compilation cache (tests/conftest.py); the size limit turns on
  JAX's file lock, so that two processes never read an entry half written."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = xla_flags(devices)
  env['JAX_COMPILATION_CACHE_DIR'] = os.environ['BRAINSCALE_TEST_COMPILE_CACHE']
  env['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(8 << 30)
  return env


def run_cli(*args, devices: int = 1, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
  """launch/run.py ARGS in a fresh process: cli_env(devices), updated with `env`."""
  return subprocess.run([sys.executable, 'launch/run.py', *args], cwd=ROOT,
                        env={**cli_env(devices), **(env or {})}, capture_output=True, text=True,
                        timeout=timeout)


def start_cli(*args, devices: int = 1) -> subprocess.Popen:
  """run_cli without waiting: communicate() gives (stdout, stderr)."""
  return subprocess.Popen([sys.executable, 'launch/run.py', *args], cwd=ROOT, env=cli_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_line(text: str) -> str:
  return [line for line in text.splitlines() if line.strip()][-1]


def smoke(**overrides):
  """The smoke config with `a__b=value` overrides."""
  c = config_lib.load('smoke')
  c.experiment = 'smoke'
  for key, value in overrides.items():
    *parents, leaf = key.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# --- end to end through launch/run.py -------------------------------------------------


@pytest.mark.slow
def test_trains_checkpoints_and_resumes_from_step_12_to_20(tmp_path):
  first = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=12')
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'from scratch' in first.stdout
  assert Checkpoints(tmp_path, keep=3).steps() == [12]

  second = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=20')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming from step 12' in second.stdout
  assert re.search(r'^step 20/20 ', second.stdout, re.M)
  assert not re.search(r'^step (\d|1[0-2])/', second.stdout, re.M)  # nothing redone
  checkpoints = Checkpoints(tmp_path, keep=3)
  assert checkpoints.steps() == [12, 20]
  saved = checkpoints.config(20)  # the resolved config beside the checkpoint
  assert saved['train']['steps'] == 20 and saved['experiment'] == 'smoke'

  evaluated = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--mode=eval')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert re.search(r'^eval step 20 \| accuracy [\d.]+ \| loss [\d.]+', evaluated.stdout, re.M)

  # TensorBoard reads the event files back: every logged training scalar is there.
  scalars = {}
  for path in glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*')):
    acc = event_accumulator.EventAccumulator(path)
    acc.Reload()
    for tag in acc.Tags()['scalars']:
      scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
  assert {'train/loss', 'train/grad_norm', 'train/learning_rate', 'perf/mfu',
          'perf/steps_per_s', 'eval/loss'} <= set(scalars)
  assert set(scalars['train/loss']) == {12, 20}  # log_every=25: the last step of each run
  jsonl = report.read_jsonl(tmp_path / 'metrics.jsonl')
  assert scalars['train/loss'][20] == pytest.approx(jsonl[20]['train/loss'], rel=1e-6)


def _losses(workdir) -> dict[int, float]:
  rows = report.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return {s: r['train/loss'] for s, r in rows.items() if 'train/loss' in r}


def _kill_when(args, workdir, ready, deadline_s=240):
  """Starts run.py and SIGKILLs it as soon as `ready()` holds; returns whether it was killed."""
  proc = subprocess.Popen([sys.executable, 'launch/run.py', *args], cwd=ROOT, env=cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  start = time.time()
  while proc.poll() is None and time.time() - start < deadline_s:
    if ready():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.002)
  proc.kill()
  proc.wait()
  return False


@pytest.mark.slow
def test_kill_9_anywhere_resumes_bit_identical(tmp_path):
  """SIGKILL mid-step and mid-checkpoint-write; the rerun's losses equal an uninterrupted run."""
  steps = 40
  common = ['--experiment=smoke', f'--config.train.steps={steps}',
            '--config.checkpoint.every_steps=4', '--config.checkpoint.keep=2',
            '--config.train.log_every=1']
  reference = run_cli(*common, f'--workdir={tmp_path / "reference"}')
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = _losses(tmp_path / 'reference')
  assert sorted(expected) == list(range(1, steps + 1))

  seed = random.randrange(1 << 30)
  rng = random.Random(seed)
  kill_steps = [rng.randrange(3, steps - 5), rng.randrange(3, steps - 5)]
  for i, kill_at in enumerate(kill_steps + ['checkpoint-write']):
    workdir = tmp_path / f'killed{i}'
    args = common + [f'--workdir={workdir}']
    jsonl = workdir / 'metrics.jsonl'
    if kill_at == 'checkpoint-write':  # a second save is being written
      ready = lambda w=workdir: len(glob.glob(f'{w}/checkpoints/*tmp*')) > 0 and os.path.exists(
          f'{w}/checkpoints/4')
    else:
      ready = lambda k=kill_at, j=jsonl: j.exists() and max(_losses(j.parent) or [0]) >= k
    assert _kill_when(args, workdir, ready), f'run finished before kill point {kill_at}'
    if kill_at == 'checkpoint-write':
      assert glob.glob(f'{workdir}/checkpoints/*tmp*'), 'the kill missed the checkpoint write'
    before = Checkpoints(workdir, keep=2).steps()
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_from = max(before, default=0)
    assert (f'resuming from step {resumed_from}' if before else 'from scratch') in rerun.stdout
    got = _losses(workdir)
    assert sorted(got) == sorted(expected)
    mismatched = [s for s in expected if got[s] != expected[s]]
    assert not mismatched, (f'seed {seed}, kill at {kill_at}: losses differ at steps '
                            f'{mismatched[:5]}')
    assert not glob.glob(f'{workdir}/checkpoints/*tmp*')


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_it_stops_at_and_resumes_identically(tmp_path):
  """SIGTERM (SLURM's notice): save at the step reached, exit 75 (requeue me), resume exactly."""
  steps = 60
  common = ['--experiment=smoke', f'--config.train.steps={steps}',
            '--config.checkpoint.every_steps=1000', '--config.train.log_every=1']
  reference = run_cli(*common, f'--workdir={tmp_path / "reference"}')
  assert reference.returncode == 0, reference.stderr[-3000:]
  expected = _losses(tmp_path / 'reference')

  workdir = tmp_path / 'preempted'
  proc = subprocess.Popen([sys.executable, 'launch/run.py', *common, f'--workdir={workdir}'],
                          cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  jsonl = workdir / 'metrics.jsonl'
  while (proc.poll() is None and not (jsonl.exists() and max(_losses(workdir) or [0]) >= 10)
         and time.time() < deadline):
    time.sleep(0.01)
  assert proc.poll() is None, 'the run ended before it could be signalled'
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-3000:]
  stopped = int(re.search(r'stopped at the agreed step (\d+); checkpoint saved', out).group(1))
  assert 10 <= stopped < steps
  assert Checkpoints(workdir, keep=3).steps() == [stopped]
  assert f'checkpoint of step {stopped} saved' in err   # run.py's one line on stderr

  rerun = run_cli(*common, f'--workdir={workdir}')
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resuming from step {stopped}' in rerun.stdout
  got = _losses(workdir)
  assert sorted(got) == sorted(expected)
  assert [s for s in expected if got[s] != expected[s]] == []


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1(tmp_path):
  sharded = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=6',
                    '--config.mesh.ici.data=2', '--config.mesh.ici.fsdp=2',
                    '--config.mesh.ici.tensor=2', devices=8)
  assert sharded.returncode == 0, sharded.stderr[-3000:]
  assert "'data': 2, 'fsdp': 2, 'sequence': 1, 'tensor': 2} on 8 cpu" in sharded.stdout
  single = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=9')
  assert single.returncode == 0, single.stderr[-3000:]
  assert 'resuming from step 6' in single.stdout and 'on 1 cpu' in single.stdout


@pytest.mark.slow
def test_incompatible_checkpoint_names_the_parameter(tmp_path):
  assert run_cli('--experiment=smoke', f'--workdir={tmp_path}',
                 '--config.train.steps=2').returncode == 0
  bad = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=4',
                '--config.model.mlp_hidden=96')
  assert bad.returncode == 2
  line = last_line(bad.stderr)
  assert re.fullmatch(r'brainscale: checkpoint step 2 in \S+ does not fit this config: '
                      r'params/blocks/layers/mlp/w_\w+ has shape \(2, \d+, \d+\) there, '
                      r'\(2, \d+, \d+\) here', line), line


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_metric(tmp_path):
  out = run_cli('--experiment=smoke', f'--workdir={tmp_path}', '--config.train.steps=20',
                '--config.train.learning_rate=1e30', '--config.train.warmup_steps=0',
                '--config.train.grad_clip=0.0')
  assert out.returncode == 1
  line = last_line(out.stderr)
  assert re.match(r'brainscale: non-finite .*(loss|grad_norm)=(nan|inf).* at step \d+; stopping',
                  line), line


@pytest.mark.slow
def test_describe_80b_allocates_nothing():
  """A ~80B config describes in a process that could not hold its fp32 params (320 GB)."""
  m = dict(dim=8192, layers=96, heads=64, kv_heads=64, head_dim=128, mlp_hidden=32768,
           vocab=131072)
  args = [f'--config.model.{k}={v}' for k, v in m.items()] + ['--config.model.mlp=gelu',
                                                             '--config.model.loss_chunk=8192']
  # Peak memory of the describe process itself: VmHWM of its own (post-exec) address
  # space. getrusage would report the forking pytest process's size instead.
  run_and_report = (
      'import runpy, sys\n'
      f'sys.argv = [{str(ROOT / "launch" / "run.py")!r}] + sys.argv[1:]\n'
      'try:\n  runpy.run_path(sys.argv[0], run_name="__main__")\n'
      'except SystemExit as e:\n  assert not e.code, e.code\n'
      'status = open("/proc/self/status").read()\n'
      'print("VmHWM_kB", status.split("VmHWM:")[1].split()[0])\n')
  out = subprocess.run([sys.executable, '-c', run_and_report, '--experiment=smoke',
                        '--mode=describe', *args], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  output = out.stdout
  d, f, layers = m['dim'], m['mlp_hidden'], m['layers']
  per_layer = 4 * d * d + 2 * d * f + 2 * d + 2 * m['head_dim']
  expected = layers * per_layer + 2 * m['vocab'] * d + d
  assert int(re.search(r'^params: (\d+)', output, re.M).group(1)) == expected
  assert 78e9 < expected < 82e9
  peak_kib = int(re.search(r'^VmHWM_kB (\d+)', output, re.M).group(1))
  assert peak_kib < 4 << 20  # far below the 320 GB its fp32 params would take


# --- in process ------------------------------------------------------------------------


def test_smoke_learns_to_reverse(tmp_path):
  """The default smoke run (300 steps, under a minute on 2 cores) learns the task."""
  start = time.time()
  metrics = loop.train(smoke(train__eval_every=100), str(tmp_path))
  initial = math.log(30)  # uniform over the 30 content tokens
  assert metrics['eval_loss'] < 0.2 * initial, metrics
  assert metrics['eval_accuracy'] > 0.9, metrics
  assert 'tensorflow' not in sys.modules  # the trainer runs where TensorFlow is absent
  rows = report.read_jsonl(tmp_path / 'metrics.jsonl')
  eval_losses = [rows[s]['eval/loss'] for s in (100, 200, 300)]  # periodic eval + the final one
  assert eval_losses[0] > eval_losses[2] == pytest.approx(metrics['eval_loss'])
  print(f'smoke: eval loss {metrics["eval_loss"]:.4f} in {time.time() - start:.1f}s')


def test_describe_params_match_the_initialised_model():
  c = smoke()
  setup = step_lib.build(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  state = step_lib.init_state(setup)
  n = sum(x.size for x in jax.tree.leaves(state['params']))
  text = describe.describe(c, num_devices=1)
  assert int(re.search(r'^params: (\d+)', text, re.M).group(1)) == n
  assert re.search(r'flops_per_step: [\d.e+]+', text)
  assert re.search(r'total\s+[\d.]+ GiB', text)


def test_restore_onto_other_meshes_and_device_counts(tmp_path):
  c8 = smoke()
  c8.mesh.ici.data, c8.mesh.ici.fsdp, c8.mesh.ici.tensor = 2, 2, 2
  setup8 = step_lib.build(c8, parallel.make_mesh(c8.mesh, jax.devices()))
  state = step_lib.init_state(setup8)
  sharded = [x for x in jax.tree.leaves(state['params']) if len(x.sharding.device_set) == 8
             and x.addressable_shards[0].data.shape != x.shape]
  assert sharded, 'nothing was sharded on the 8-device mesh'
  ckpt = Checkpoints(tmp_path, keep=2)
  ckpt.save(1, state, None, c8)
  ckpt.close()
  saved = jax.device_get(state)
  for devices, ici in ((2, dict(fsdp=2)), (2, dict(fsdp=1, tensor=2)), (1, dict())):
    c = smoke()
    for axis, size in ici.items():
      c.mesh.ici[axis] = size
    setup = step_lib.build(c, parallel.make_mesh(c.mesh, jax.devices()[:devices]))
    restored = Checkpoints(tmp_path, keep=2).restore(1, setup.abstract_state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(got), want)
    for got, abstract in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.abstract_state)):
      assert got.sharding == abstract.sharding
      assert len(got.sharding.device_set) == devices


def test_resume_into_a_different_model_fails_clearly(tmp_path):
  c = smoke()
  setup = step_lib.build(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  ckpt = Checkpoints(tmp_path, keep=2)
  ckpt.save(3, step_lib.init_state(setup), None, c)
  ckpt.close()
  other = smoke(model__layers=3)
  setup = step_lib.build(other, parallel.make_mesh(other.mesh, jax.devices()[:1]))
  with pytest.raises(config_lib.ConfigError,
                     match=r'params/blocks/layers/\S+ has shape \(2,.* there, \(3,.* here'):
    Checkpoints(tmp_path, keep=2).restore(3, setup.abstract_state)


def test_schedule_warms_up_then_decays_to_the_floor():
  c = smoke(train__steps=100, train__warmup_steps=10, train__learning_rate=1e-3,
            train__min_lr_ratio=0.1)
  lr = optim.schedule(c)
  assert float(lr(0)) == 0.0
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(100)) == pytest.approx(1e-4)
  values = [float(lr(s)) for s in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_parameter_groups_get_their_own_learning_rate():
  """A group with lr_scale 0 leaves its parameters untouched; the others move."""
  c = smoke(train__warmup_steps=0)
  c.train.groups.no_decay.lr_scale = 0.0
  params = {'attn': {'w_q': np.ones((3, 3), np.float32)},
            'norm': {'scale_D': np.ones(3, np.float32)}}
  labels = optim.group_labels(params, c.train.groups)
  assert labels == {'attn': {'w_q': 'default'}, 'norm': {'scale_D': 'no_decay'}}
  tx = optim.make(c)
  grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['norm']['scale_D'], params['norm']['scale_D'])
  assert np.all(np.asarray(new['attn']['w_q']) < 1.0)


def test_a_frozen_group_wins_over_a_group_that_also_matches():
  """Freezing a subtree freezes its norms too, though no_decay also names them."""
  c = smoke()
  with c.unlocked():
    c.train.groups.frozen = dict(pattern=r'^tower/', lr_scale=0.0, weight_decay=0.0)
  params = {'tower': {'norm': {'scale_D': np.ones(3, np.float32)}},
            'head': {'norm': {'scale_D': np.ones(3, np.float32)}}}
  labels = optim.group_labels(params, c.train.groups)
  assert labels == {'tower': {'norm': {'scale_D': 'frozen'}},
                    'head': {'norm': {'scale_D': 'no_decay'}}}


def test_metrics_jsonl_survives_a_line_cut_short(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/lo')
  writer = report.Writer(str(tmp_path))
  writer.scalars(2, {'train/loss': 1.25})
  writer.close()
  assert report.read_jsonl(path) == {1: {'train/loss': 2.5}, 2: {'train/loss': 1.25}}


def test_a_metric_with_nothing_to_measure_is_left_out_not_zero():
  steps = [{'loss': 1.0, 'nll_rare': float('nan'), 'nll_never': float('nan')},
           {'loss': 3.0, 'nll_rare': 0.5, 'nll_never': float('nan')}]
  assert report.average(steps) == {'loss': 2.0, 'nll_rare': 0.5}
  loop._check_finite(1, steps[0], None)   # a NaN metric does not stop training
  with pytest.raises(loop.NonFiniteError, match=r'non-finite loss=nan at step 3'):
    loop._check_finite(3, {'loss': float('nan'), 'nll_rare': 0.5}, 2)
