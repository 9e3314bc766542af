"""Checkpoints written by earlier code restore: tests/fixtures/c692af4/ holds step-0 checkpoints
written by commit c692af4 (tests/fixtures/make_c692af4_checkpoints.py made them)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'c692af4'


@pytest.mark.parametrize('name,same_init', [('cwm_tiny', True), ('enigma_tiny_adapt', False)])
def test_a_checkpoint_written_by_c692af4_restores_params_and_optimizer_state(name, same_init):
  """The whole train state (parameter paths, the frozen prerequisite's optimizer group)
  reads back into today's layout; cwm_tiny's holds the params today's code initialises
  (Enigma's init compiles for a minute on 2 cores, so it is restored only)."""
  run = json.loads((FIXTURES / name / 'run.json').read_text())
  config = config_lib.resolve(run['experiment'], run['overrides'])
  setup = step_lib.build(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
  checkpoints = Checkpoints(str(FIXTURES / name), keep=1, async_save=False)
  state = checkpoints.restore(0, setup.abstract_state)
  checkpoints.close()
  assert jax.tree.structure(state) == jax.tree.structure(setup.abstract_state)
  assert int(state['step']) == 0
  if same_init:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']),
                 jax.device_get(step_lib.init_state(setup)['params']))
