"""The seam between the trainer and a family: small, and enough to train a new family."""

import inspect
import textwrap

import pytest

import brainscale
from brainscale import config as config_lib
from brainscale.train import describe, loop, task

FAMILY = '''
"""A family written against the seam only: the five required methods, no Costs."""

import jax
import jax.numpy as jnp

from brainscale import nn
from brainscale.smoke import data
from brainscale.smoke.model import TinyLM
from brainscale.train import task


class Task(task.Task):

  def model(self, rngs):
    return TinyLM(self.config.model, rngs=rngs)

  def _batches(self, seed, process_index, process_count):
    c = self.config
    return iter(data.pipeline(seed=seed, length=c.data.length, vocab=c.model.vocab,
                              batch_size=c.train.batch_size, process_index=process_index,
                              process_count=process_count, workers=0, prefetch=0))

  def train_data(self, process_index, process_count):
    return self._batches(0, process_index, process_count)

  def eval_data(self, process_index, process_count):
    return [next(self._batches(1, process_index, process_count))]

  def batch_shapes(self, batch_size):
    t = 2 * self.config.data.length + 1
    return {'inputs': jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
            'targets': jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
            'mask': jax.ShapeDtypeStruct((batch_size, t), jnp.float32)}

  def loss(self, model, batch, rng, train):
    x_BxTxD = model.features(batch['inputs'])
    nll_BxT = nn.cross_entropy(model.head(x_BxTxD), batch['targets'])
    loss = nn.masked_mean(nll_BxT, batch['mask'])
    return loss, {'loss': loss}
'''


def test_the_seam_has_five_methods_to_write_and_two_with_defaults():
  assert task.Task.__abstractmethods__ == {'model', 'train_data', 'eval_data', 'batch_shapes',
                                           'loss'}
  public = {n for n, f in inspect.getmembers(task.Task, inspect.isfunction)
            if not n.startswith('_')}
  assert public == task.Task.__abstractmethods__ | {'evaluate', 'prerequisites'}


def test_a_new_family_is_a_folder_that_trains(tmp_path, monkeypatch, capsys):
  """brainscale/<family>/task.py with only the required methods trains and evaluates; what
  needs Costs (describe) says so in one line."""
  folder = tmp_path / 'families' / 'parrot'
  folder.mkdir(parents=True)
  (folder / '__init__.py').write_text('')
  (folder / 'task.py').write_text(textwrap.dedent(FAMILY))
  monkeypatch.setattr(brainscale, '__path__', [*brainscale.__path__, str(folder.parent)])
  config = config_lib.resolve('smoke', ['--config.task=parrot', '--config.train.steps=3',
                                        '--config.train.log_every=1'])
  result = loop.train(config, str(tmp_path / 'run'))
  assert 'eval_loss' in result and result['eval_loss'] > 0
  log = capsys.readouterr().out
  assert 'step 3/3' in log and 'MFU' not in log
  with pytest.raises(config_lib.ConfigError, match='parrot.task.Task declares no costs'):
    describe.describe(config, num_devices=1)
