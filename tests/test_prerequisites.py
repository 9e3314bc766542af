"""Prerequisite runs planned before training (no recursion), frozen by the trainer, settings
derived once, Setups that die with their last reference."""

import gc
import textwrap
import weakref

import jax
import ml_collections
import numpy as np
import pytest

import brainscale
from brainscale import config as config_lib
from brainscale.train import describe, loop, prerequisites
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints
from brainscale.train.prerequisites import Prerequisite


class _Chain:
  """A stand-in task whose prerequisites are named by config.needs: [(experiment, dir)]."""

  def __init__(self, config):
    self.config = config

  def prerequisites(self):
    return {name: Prerequisite(_config(name, needs), run_dir)
            for name, run_dir, needs in self.config.needs}


def _config(name, needs=()):
  c = ml_collections.ConfigDict({'experiment': name, 'checkpoint': {'keep': 1},
                                 'needs': list(needs)})
  return c


@pytest.fixture
def chain(monkeypatch, tmp_path):
  """Runs a <- b <- c (a needs b, b needs c, and a also needs c); `done` have checkpoints."""
  done = set()
  monkeypatch.setattr(prerequisites, 'get_task', _Chain)
  monkeypatch.setattr(prerequisites, 'has_checkpoint', lambda workdir: workdir in done)
  d = {n: str(tmp_path / n) for n in 'abc'}
  c_needs = []
  b_needs = [('c', d['c'], c_needs)]
  a = _config('a', [('b', d['b'], b_needs), ('c', d['c'], c_needs)])
  return a, d, done


def test_prerequisites_come_first_once_each(chain):
  a, d, _ = chain
  order = [(c.experiment, w) for c, w in prerequisites.runs_to_train(a, d['a'])]
  assert order == [('c', d['c']), ('b', d['b']), ('a', d['a'])]


def test_a_run_with_a_checkpoint_needs_no_prerequisites(chain):
  a, d, done = chain
  done.add(d['b'])            # b started: c is not needed for it, but a still needs c
  assert [c.experiment for c, _ in prerequisites.runs_to_train(a, d['a'])] == ['b', 'c', 'a']
  done.add(d['a'])            # a resumes from its own checkpoint
  assert [c.experiment for c, _ in prerequisites.runs_to_train(a, d['a'])] == ['a']


def test_a_cycle_of_prerequisites_is_a_config_error(chain, tmp_path):
  _, d, _ = chain
  loop_needs = []
  a = _config('a', [('b', d['b'], [('a', d['a'], loop_needs)])])
  with pytest.raises(config_lib.ConfigError, match='prerequisite runs form a cycle'):
    prerequisites.runs_to_train(a, d['a'])


def test_train_trains_each_planned_run_once_without_recursion(chain, monkeypatch):
  a, d, _ = chain
  trained = []
  monkeypatch.setattr(loop, 'train_one', lambda c, w: trained.append(c.experiment) or
                      {'eval_loss': len(trained)})
  assert loop.train(a, d['a']) == {'eval_loss': 3}
  assert trained == ['c', 'b', 'a']


def test_the_tokenizer_model_is_derived_from_the_tokenizer_run():
  c = config_lib.resolve('cwm_tiny', ["--config.tokenizer.overrides=('--config.model.bits=8',)"])
  tok = config_lib.resolve('cwm_tokenizer_tiny', ['--config.model.bits=8'])
  assert c.tokenizer.model.to_dict() == tok.model.to_dict()
  with pytest.raises(config_lib.ConfigError, match='--config.tokenizer.model.bits: the '
                     'tokenizer comes from tokenizer.experiment=cwm_tokenizer_tiny'):
    config_lib.resolve('cwm_tiny', ['--config.tokenizer.model.bits=8'])
  # no tokenizer run: an untrained tokenizer, its settings given directly
  c = config_lib.resolve('cwm_tiny', ['--config.tokenizer.experiment=',
                                      '--config.tokenizer.model.bits=8'])
  assert c.tokenizer.model.bits == 8


def test_a_setup_and_what_was_made_for_it_die_with_it():
  setup = step_lib.build(config_lib.resolve('smoke', []))
  eval_step = step_lib.make_eval_step(setup)
  assert step_lib.make_eval_step(setup) is eval_step
  gone = weakref.ref(setup)
  del setup, eval_step
  gc.collect()
  assert gone() is None


SMALL = ['--config.model.layers=1', '--config.train.batch_size=8', '--config.train.eval_batches=1']

# A smoke model whose embedding table comes from a smoke run beside it and stays frozen; the
# experiment names no group for it (smoke's only group is no_decay).
PUPIL = '''
from brainscale import config as config_lib
from brainscale.smoke import task as smoke
from brainscale.train.prerequisites import Prerequisite


class Task(smoke.Task):

  def prerequisites(self):
    teacher = config_lib.resolve('smoke', [*{small}, '--config.train.steps=4', '--config.seed=7'])
    return {{'embed': Prerequisite(teacher, '../teacher', subtree='embed')}}
'''.format(small=SMALL)


def _final_params(workdir, config):
  checkpoints = Checkpoints(workdir, keep=3, async_save=False)
  step, state = checkpoints.restore_newest(step_lib.build(config).abstract_state)
  checkpoints.close()
  return step, jax.tree.map(np.asarray, state['params'])


@pytest.mark.slow
def test_a_frozen_prerequisite_does_not_move_without_a_group_in_the_experiment(
    tmp_path, monkeypatch):
  folder = tmp_path / 'families' / 'pupil'
  folder.mkdir(parents=True)
  (folder / '__init__.py').write_text('')
  (folder / 'task.py').write_text(textwrap.dedent(PUPIL))
  monkeypatch.setattr(brainscale, '__path__', [*brainscale.__path__, str(folder.parent)])
  config = config_lib.resolve('smoke', [*SMALL, '--config.task=pupil', '--config.train.steps=3'])
  assert list(config.train.groups) == ['no_decay']
  loop.train(config, str(tmp_path / 'pupil'))

  teacher_config = step_lib.get_task(config).prerequisites()['embed'].config
  step, teacher = _final_params(str(tmp_path / 'teacher'), teacher_config)
  assert step == 4
  step, pupil = _final_params(str(tmp_path / 'pupil'), config)
  assert step == 3
  jax.tree.map(np.testing.assert_array_equal, pupil['embed'], teacher['embed'])
  init = jax.tree.map(np.asarray, step_lib.init_state(step_lib.build(config))['params'])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                       pupil['blocks'], init['blocks']))
  assert all(moved)
  groups = describe.describe(config, num_devices=1).split('optimizer groups')[1].splitlines()
  assert 'frozen' in next(line for line in groups if line.split()[0] == 'embed')
