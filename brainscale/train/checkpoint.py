"""Checkpoints: Orbax CheckpointManager, async and atomic, one directory per step.

Each step directory holds `state` (params, optimizer state, step), `data` (the
Grain iterator state of every process) and `config` (the resolved config as
JSON). Orbax writes into a temporary directory and renames it when complete,
so a crash mid-write leaves the previous checkpoint as the newest one.
Restoring takes an abstract target with the *current* shardings, so a
checkpoint restores onto any mesh or device count.
"""

import json
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from brainscale.config import ConfigError


class Checkpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).resolve() / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` at `step`; returns whether one started."""
    args = {'state': ocp.args.StandardSave(state),
            'config': ocp.args.JsonSave(json.loads(config.to_json()))}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def check_compatible(self, step: int, abstract_state):
    """Raises a one-line ConfigError naming the first parameter that does not fit."""
    saved = self.manager.item_metadata(step)['state']
    saved_flat = {jax.tree_util.keystr(p, simple=True, separator='/'): m
                  for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    here_flat = {jax.tree_util.keystr(p, simple=True, separator='/'): a
                 for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    where = f'checkpoint step {step} in {self.directory}'
    params_first = sorted(here_flat, key=lambda name: not name.startswith('params/'))
    for name in params_first:
      want = here_flat[name]
      if name not in saved_flat:
        raise ConfigError(f'{where} has no {name}, which this config needs '
                          f'(shape {tuple(want.shape)}); was it written by another model?')
      if tuple(saved_flat[name].shape) != tuple(want.shape):
        raise ConfigError(f'{where} does not fit this config: {name} has shape '
                          f'{tuple(saved_flat[name].shape)} there, {tuple(want.shape)} here')
    extra = sorted(set(saved_flat) - set(here_flat))
    if extra:
      raise ConfigError(f'{where} has {extra[0]} (and {len(extra) - 1} more), which this '
                        f'config does not have')

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores `state` (into `abstract_state`'s shardings) and the data iterator in place."""
    self.check_compatible(step, abstract_state)
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored['state']

  def config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
