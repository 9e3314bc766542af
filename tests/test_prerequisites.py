"""Prerequisite runs planned before training (no recursion), settings derived once, Setups
that die with their last reference."""

import gc
import weakref

import ml_collections
import pytest

from brainscale import config as config_lib
from brainscale.train import loop


class _Chain:
  """A stand-in task whose prerequisites are named by config.needs: [(experiment, dir)]."""

  def __init__(self, config):
    self.config = config

  def prerequisites(self, workdir):
    del workdir
    return {name: (_config(name, needs), run_dir)
            for name, run_dir, needs in self.config.needs}


def _config(name, needs=()):
  c = ml_collections.ConfigDict({'experiment': name, 'checkpoint': {'keep': 1},
                                 'needs': list(needs)})
  return c


@pytest.fixture
def chain(monkeypatch, tmp_path):
  """Runs a <- b <- c (a needs b, b needs c, and a also needs c); `done` have checkpoints."""
  done = set()
  monkeypatch.setattr(loop, 'get_task', _Chain)
  monkeypatch.setattr(loop, 'has_checkpoint', lambda workdir: workdir in done)
  d = {n: str(tmp_path / n) for n in 'abc'}
  c_needs = []
  b_needs = [('c', d['c'], c_needs)]
  a = _config('a', [('b', d['b'], b_needs), ('c', d['c'], c_needs)])
  return a, d, done


def test_prerequisites_come_first_once_each(chain):
  a, d, _ = chain
  order = [(c.experiment, w) for c, w in loop.runs_to_train(a, d['a'])]
  assert order == [('c', d['c']), ('b', d['b']), ('a', d['a'])]


def test_a_run_with_a_checkpoint_needs_no_prerequisites(chain):
  a, d, done = chain
  done.add(d['b'])            # b started: c is not needed for it, but a still needs c
  assert [c.experiment for c, _ in loop.runs_to_train(a, d['a'])] == ['b', 'c', 'a']
  done.add(d['a'])            # a resumes from its own checkpoint
  assert [c.experiment for c, _ in loop.runs_to_train(a, d['a'])] == ['a']


def test_a_cycle_of_prerequisites_is_a_config_error(chain, tmp_path):
  _, d, _ = chain
  loop_needs = []
  a = _config('a', [('b', d['b'], [('a', d['a'], loop_needs)])])
  with pytest.raises(config_lib.ConfigError, match='prerequisite runs form a cycle'):
    loop.runs_to_train(a, d['a'])


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
  setup = loop.build(config_lib.resolve('smoke', []))
  eval_step = loop.make_eval_step(setup)
  assert loop.make_eval_step(setup) is eval_step
  gone = weakref.ref(setup)
  del setup, eval_step
  gc.collect()
  assert gone() is None
