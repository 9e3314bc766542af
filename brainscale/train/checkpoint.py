"""Checkpoints: Orbax CheckpointManager, async and atomic, one directory per step.

Each step directory holds `state` (params, optimizer state, step), `data` (the
Grain iterator state of every process) and `config` (the resolved config as
JSON). Orbax writes into a temporary directory and renames it when complete,
so a crash mid-write leaves the previous checkpoint as the newest one.
Restoring takes an abstract target with the *current* shardings, so a
checkpoint restores onto any mesh or device count.

Reading steps past faults and destroys nothing: a checkpoint that fails to read
(a truncated or overwritten file, a half-deleted step folder) is
reported in one line and, once an older one has restored, moved to
workdir/broken_checkpoints/ for a post-mortem. A save that fails (disk full, no
permission) removes its own temporary folder, leaves the earlier checkpoints as
they were and raises CheckpointError: training stops (exit SAVE_FAILED_EXIT)
rather than going on without checkpoints.
"""

import contextlib
import json
import math
import pathlib
import shutil
import sys
import weakref

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils

from brainscale.config import ConfigError

SAVE_FAILED_EXIT = 74   # sysexits' EX_IOERR: a checkpoint could not be written

_OPEN = weakref.WeakSet()   # Checkpoints not closed yet (finish_saves)


def chunk_aligned(sharding, shape: tuple[int, ...], chunks: tuple[int, ...]):
  """`sharding` if each of its shards is whole stored chunks of an array of `shape` saved in
  `chunks`; else a NamedSharding over the same devices that splits the chunk grid over them
  (as many ways as the grid and the device count share; the rest hold copies)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  shard = sharding.shard_shape(shape)
  if all(s == n or s % c == 0 for s, n, c in zip(shard, shape, chunks)):
    return sharding
  devices = np.asarray(sharding.mesh.devices).reshape(-1)
  left, ways = devices.size, [1] * len(shape)
  for axis in sorted(range(len(shape)), key=lambda a: -(shape[a] // chunks[a])):
    if shape[axis] % chunks[axis] == 0:
      ways[axis] = math.gcd(shape[axis] // chunks[axis], left)
      left //= ways[axis]
  axes = [f'chunks{i}' for i in range(len(shape))]
  mesh = jax.sharding.Mesh(devices.reshape(*ways, left), (*axes, 'copies'))
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*(a if w > 1 else None for a, w in zip(axes, ways))))


class CheckpointError(RuntimeError):
  """No checkpoint could be written, or none of those present could be read."""


def one_line(error: BaseException, limit: int = 400) -> str:
  """The first line of an error's root cause (TensorStore's names the array and the file,
  Orbax's wrapper only the index), at most `limit` characters."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).split(' See full TensorStore details')[0]
  text = (text.strip().splitlines() or [type(error).__name__])[0]
  return f'{type(error).__name__}: {text[:limit]}'


def _quiet_orbax_echoes():
  """After a failed read or write TensorStore's threads still call into Orbax's closed
  asyncio loop, and Orbax's abandoned coroutines are collected with their error; Python
  prints each as a traceback. The error itself surfaces through Orbax's API (and is
  reported once, in one line): drop only those echoes."""
  previous = sys.unraisablehook
  if getattr(previous, 'brainscale', False):
    return

  def echo(unraisable) -> bool:
    code = getattr(unraisable.object, 'cr_code', None)
    return ((isinstance(unraisable.exc_value, RuntimeError)
             and str(unraisable.exc_value) == 'Event loop is closed')
            or (code is not None and '/orbax/' in code.co_filename))

  def hook(unraisable):
    if not echo(unraisable):
      previous(unraisable)

  hook.brainscale = True
  sys.unraisablehook = hook


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a committed checkpoint; reads only (creates no directory)."""
  if not (pathlib.Path(workdir) / 'checkpoints').is_dir():
    return False
  checkpoints = Checkpoints(workdir, keep=1, async_save=False)
  try:
    return checkpoints.latest() is not None
  finally:
    checkpoints.close()


class Checkpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).resolve() / 'checkpoints'
    self.broken = self.directory.parent / 'broken_checkpoints'
    _quiet_orbax_echoes()
    self._in_flight = None   # the step of an async save not yet committed
    _OPEN.add(self)
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
    """Starts an (async) save of `state` at `step`; returns whether one started.

    A failure of the save still in flight surfaces here (or at wait() or close()).
    """
    args = {'state': ocp.args.StandardSave(state),
            'config': ocp.args.JsonSave(json.loads(config.to_json()))}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()
    with self._failing_as(step):
      started = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    self._in_flight = step if started else None
    return started

  @contextlib.contextmanager
  def _failing_as(self, step: int | None):
    """A failed save becomes CheckpointError, once its temporary folder is removed."""
    try:
      yield
    except Exception as e:
      self._remove_temporary()
      which = f'checkpoint step {step}' if step is not None else 'a checkpoint'
      raise CheckpointError(f'could not save {which} in {self.directory} ({one_line(e)}); '
                            f'the checkpoints before it are intact') from e

  def _remove_temporary(self):
    if jax.process_index() != 0 or not self.directory.is_dir():
      return
    for path in self.directory.glob('*.orbax-checkpoint-tmp*'):
      shutil.rmtree(path, ignore_errors=True)

  def check_compatible(self, step: int, abstract_state):
    """Raises a one-line ConfigError naming the first parameter that does not fit."""
    saved = self.manager.item_metadata(step)['state']
    saved_flat = {jax.tree_util.keystr(p, simple=True, separator='/'): m
                  for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    self._compare(step, saved_flat, abstract_state)

  def _compare(self, step: int, saved_flat: dict, abstract_state):
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

  def restore_params(self, step: int, abstract_params, *, concurrent_gb: float | None = None):
    """Only the params of checkpoint `step`, read into `abstract_params`' dtypes and shardings.

    `abstract_params` is a tree of ShapeDtypeStructs with shardings, like state['params'].
    Orbax's partial restore reads these arrays alone: the optimizer moments and the data
    iterator state are never opened. A dtype unlike the saved one is cast as the chunks
    are read (the saved bytes are still read whole). Each array is read in whole stored
    chunks per device (`chunk_aligned`), then laid out as asked on device, one array at a
    time: a target shard that cut across stored chunks would read each chunk once per
    shard it touches (benchmarks/RESULTS.md, "Bytes read"). `concurrent_gb` is Orbax's
    restore_concurrent_gb (the bytes in flight; default its own).
    """
    item = {'params': abstract_params}
    saved = self._saved_params(step)
    self._compare(step, {name: shape for name, (shape, _) in saved.items()}, item)
    paths, treedef = jax.tree_util.tree_flatten_with_path(item)
    names = [jax.tree_util.keystr(p, simple=True, separator='/') for p, _ in paths]
    wanted = [a for _, a in paths]
    read_as = [jax.ShapeDtypeStruct(a.shape, a.dtype,
                                    sharding=chunk_aligned(a.sharding, a.shape, saved[n][1]))
               for n, a in zip(names, wanted)]
    read_item = jax.tree.unflatten(treedef, read_as)
    args = ocp.args.PyTreeRestore(item=read_item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(
                                      read_item))
    handler = (ocp.PyTreeCheckpointHandler() if concurrent_gb is None else
               ocp.PyTreeCheckpointHandler(restore_concurrent_gb=concurrent_gb))
    with ocp.Checkpointer(handler) as checkpointer:
      read = checkpointer.restore(self.directory / str(step) / 'state', args=args)
    leaves = jax.tree.leaves(read)
    del read
    out = []
    for i, want in enumerate(wanted):   # one array at a time: two layouts of one alive at most
      x, leaves[i] = leaves[i], None
      out.append(x if x.sharding == want.sharding else
                 jax.block_until_ready(jax.device_put(x, want.sharding)))
      del x
    return jax.tree.unflatten(treedef, out)['params']

  def _saved_params(self, step: int) -> dict:
    """{'params/...': (ShapeDtypeStruct, stored chunk shape)} of checkpoint `step`, from the
    tree's and the params' own metadata files only (Orbax's item_metadata would open the
    optimizer state too)."""
    directory = self.directory / str(step) / 'state'
    tree = json.loads((directory / '_METADATA').read_text())['tree_metadata'].values()
    names = ['/'.join(k['key'] for k in entry['key_metadata']) for entry in tree
             if entry['key_metadata'][0]['key'] == 'params']
    kvstore = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{directory}/'}).result()
    shapes = {}
    for name in names:
      found = kvstore.read(name.replace('/', '.').encode() + b'/.zarray').result()
      if found.state == 'value':
        zarray = json.loads(found.value)
        shapes[name] = (jax.ShapeDtypeStruct(tuple(zarray['shape']), jnp.dtype(zarray['dtype'])),
                        tuple(zarray.get('chunks') or zarray['shape']))
    return shapes

  def restore_newest(self, abstract_state, data_iterator=None, *, log=print, set_aside=True):
    """(step, state) of the newest checkpoint that reads back; (None, None) if there is none.

    Each one that fails is reported by `log` in one line; once an older one has restored,
    the failed ones are moved aside (if `set_aside`; an eval of a read-only run leaves
    them). If checkpoints exist but none reads, CheckpointError.
    A checkpoint of another model (ConfigError) is not a broken one: that error stands.
    """
    failed = {}
    for step in reversed(self.steps()):
      try:
        state, error = self.restore(step, abstract_state, data_iterator), None
      except ConfigError:
        raise
      except Exception as e:
        state, error = None, e
      if _all_processes(error is None):
        for bad in failed if set_aside else ():
          self._set_aside(bad)
        return step, state
      failed[step] = error or 'unreadable on another process'
      log(f'checkpoint step {step} in {self.directory} cannot be read '
          f'({one_line(error) if error else failed[step]}); trying the one before')
    if failed:
      raise CheckpointError(f'none of the checkpoints in {self.directory} can be read (steps '
                            f'{sorted(failed)}); move them away to start from scratch')
    return None, None

  def _set_aside(self, step: int):
    """Moves a broken step folder to workdir/broken_checkpoints/ (never deletes it)."""
    if jax.process_index() == 0:
      self.broken.mkdir(exist_ok=True)
      target, n = self.broken / str(step), 1
      while target.exists():
        target, n = self.broken / f'{step}.{n}', n + 1
      shutil.move(self.directory / str(step), target)
      print(f'brainscale: moved the unreadable checkpoint step {step} to {target}',
            file=sys.stderr, flush=True)
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    self.manager.reload()

  def config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def wait(self):
    with self._failing_as(self._in_flight):
      self.manager.wait_until_finished()
    self._in_flight = None

  def close(self):
    """Waits for the save in flight, then closes; a second call does nothing."""
    if self not in _OPEN:
      return
    _OPEN.discard(self)
    try:
      self.wait()
    except CheckpointError:
      with contextlib.suppress(Exception):
        self.manager.close()
      raise
    self.manager.close()


def finish_saves() -> CheckpointError | None:
  """Waits for the saves still in flight (a run leaving on an error) and closes their
  managers; the failure of one, as the CheckpointError save() would have raised, or None."""
  failed = None
  for checkpoints in list(_OPEN):
    try:
      checkpoints.close()
    except CheckpointError as e:
      failed = failed or e
    except Exception:  # leaving anyway: the first failed save is the error reported
      pass
  return failed
