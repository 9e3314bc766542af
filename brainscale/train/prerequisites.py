"""Prerequisite runs: runs a task starts from, trained first and copied into its params.

A Task names them (`Task.prerequisites`), e.g. the tokenizer a CWM world model
reads through, or the trained core an Enigma adaptation run fits new sessions on.
The trainer trains (or resumes, or finds finished) each first, copies its final
params into the new run when that starts from scratch, and freezes the frozen ones
(step.build adds a group of lr_scale 0 for each; see optim.groups).
"""

import dataclasses
import os

import jax

from brainscale.config import ConfigError
from brainscale.train import report
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import CheckpointError, Checkpoints, has_checkpoint
from brainscale.train.task import get_task


@dataclasses.dataclass(frozen=True)
class Prerequisite:
  """A run whose final params (or their top-level `subtree`) become a top-level param.

  `workdir` is where that run trains; a relative one is relative to the workdir of the
  run that needs it ('tokenizer': inside it, '../NAME': beside it). A frozen one is
  never updated (no optimizer state either).
  """
  config: object
  workdir: str
  subtree: str | None = None
  frozen: bool = True


def run_dir(prerequisite: Prerequisite, workdir: str) -> str:
  """Where `prerequisite` of the run in `workdir` trains."""
  return os.path.normpath(os.path.join(workdir, prerequisite.workdir))


def runs_to_train(config, workdir: str) -> list[tuple]:
  """(config, workdir) of every run that `train(config, workdir)` trains, prerequisites first.

  A run that has a checkpoint needs none of its prerequisites (they were copied into it
  when it started); a prerequisite run is listed with its own prerequisites before it,
  once each.
  """
  order, seen = [], set()

  def visit(config, workdir, chain):
    if workdir in chain:
      raise ConfigError(f'prerequisite runs form a cycle: {" -> ".join(chain + (workdir,))}')
    if not has_checkpoint(workdir):
      for pre in get_task(config).prerequisites().values():
        visit(pre.config, run_dir(pre, workdir), chain + (workdir,))
    if workdir not in seen:
      seen.add(workdir)
      order.append((config, workdir))

  visit(config, workdir, ())
  return order


def prerequisite_params(setup: step_lib.Setup, workdir: str) -> dict:
  """The final params of each (already trained) prerequisite run, by top-level param name."""
  params = {}
  for name, pre in setup.task.prerequisites().items():
    if name not in setup.abstract_state['params']:
      names = sorted(setup.abstract_state['params'])
      raise ValueError(f'prerequisite {name!r} of {setup.config.experiment} is not a top-level '
                       f'parameter of its model; those are {names}')
    config, directory = pre.config, run_dir(pre, workdir)
    source = step_lib.build(config, setup.mesh)
    checkpoints = Checkpoints(directory, keep=config.checkpoint.keep, async_save=False)
    step, state = checkpoints.restore_newest(source.abstract_state, log=report.log)
    checkpoints.close()
    if step is None:
      raise CheckpointError(f'prerequisite {name!r}: no checkpoint of {config.experiment} in '
                            f'{directory}; train it first')
    restored = state['params']
    if pre.subtree is not None:
      restored = restored[pre.subtree]
    target = setup.abstract_state['params'][name]
    if jax.tree.structure(restored) != jax.tree.structure(target):
      raise ValueError(f'prerequisite {name!r}: the params of {config.experiment} do not match '
                       f'{setup.config.experiment}/{name}')
    report.log(f'prerequisite {name}: {config.experiment} in {directory}, step {step}')
    params[name] = jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
                                restored, target)
  return params
