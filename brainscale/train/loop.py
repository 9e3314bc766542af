"""The trainer, read top to bottom: mesh, task, state, step, loop.

It knows no model family: everything model-specific comes through the Task
(brainscale/train/task.py). The train state is a plain tree
{'params', 'opt_state', 'step'} of fp32 arrays sharded by the logical-axis
rules; the step casts params to the compute dtype, accumulates gradients over
micro-batches, and is jitted once with the state donated. The loop dispatches
step t+1 before it reads step t's metrics, so the host never stalls the device.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from brainscale import parallel
from brainscale.config import ConfigError
from brainscale.nn.core import axes_of
from brainscale.train import events, goodput, optim, preemption, profile, report, watchdog
from brainscale.train.checkpoint import CheckpointError, Checkpoints, has_checkpoint
from brainscale.train.task import Costs, Task, get_task


@dataclasses.dataclass(eq=False)
class Setup:
  """Everything the step needs that does not change while training."""
  config: object
  task: Task
  mesh: jax.sharding.Mesh
  rules: dict
  graphdef: nnx.GraphDef
  axes: dict             # logical axes of every parameter (a tree like params)
  tx: optax.GradientTransformation
  abstract_state: dict   # ShapeDtypeStructs with the current shardings
  made: dict = dataclasses.field(default_factory=dict, repr=False)  # built once, dies with it

  def once(self, key, make):
    """make() the first time `key` is asked for; the same object after (jitted functions)."""
    if key not in self.made:
      self.made[key] = make()
    return self.made[key]


def param_tree(model_state: nnx.State, leaf) -> dict:
  """A plain nested dict {path: leaf(variable)} of an nnx State of Params."""
  tree = {}
  for path, variable in nnx.to_flat_state(model_state):
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf(variable)
  return tree


def build(config, mesh=None) -> Setup:
  """Resolves the task, mesh, optimizer and the abstract sharded train state."""
  task = get_task(config)
  mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
  rules = parallel.rules_table(config.mesh.rules)
  model = nnx.eval_shape(lambda: task.model(nnx.Rngs(config.seed)))
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError('brainscale trains models whose state is nnx.Param only; found '
                     f'{[jax.tree_util.keystr(p) for p, _ in nnx.to_flat_state(rest)][:3]}')
  dtype = jnp.dtype(config.model.param_dtype)
  axes = param_tree(params_state, axes_of)
  shapes = param_tree(params_state, lambda v: jax.ShapeDtypeStruct(v.shape, dtype))
  param_shardings = parallel.shardings(axes, shapes, mesh, rules)
  tx = optim.make(config)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # params outside a group's mask
  opt_shardings = optax.tree_map_params(
      tx, lambda p, s: p if masked(p) else s, opt_shapes, param_shardings,
      transform_non_params=lambda _: parallel.replicated(mesh), is_leaf=masked)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = {
      'params': jax.tree.map(with_sharding, shapes, param_shardings),
      'opt_state': jax.tree.map(with_sharding, opt_shapes, opt_shardings),
      'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh)),
  }
  return Setup(config, task, mesh, rules, graphdef, axes, tx, abstract_state)


def shardings_of(abstract_tree):
  return jax.tree.map(lambda a: a.sharding, abstract_tree)


def init_state(setup: Setup) -> dict:
  """Initialises params and optimizer state directly into their shardings."""
  c = setup.config

  def init():
    _, params_state = nnx.split(setup.task.model(nnx.Rngs(c.seed)), nnx.Param)
    params = param_tree(params_state, lambda v: v[...].astype(c.model.param_dtype))
    return {'params': params, 'opt_state': setup.tx.init(params),
            'step': jnp.zeros((), jnp.int32)}

  with parallel.axis_rules(setup.mesh, setup.rules):
    return jax.jit(init, out_shardings=shardings_of(setup.abstract_state))()


def batch_shardings(setup: Setup, batch: dict) -> dict:
  """Shardings of each batch entry by the task's logical axes (computed once per layout)."""
  layout = tuple((k, np.ndim(v)) for k, v in batch.items())
  return setup.once(('batch_shardings', layout), lambda: _batch_shardings(setup, layout))


def _batch_shardings(setup: Setup, layout: tuple) -> dict:
  """Every entry split along its first dim (the example) over the batch axes."""
  return {k: NamedSharding(setup.mesh, parallel.spec(('batch',) + (None,) * (ndim - 1),
                                                     setup.rules, setup.mesh))
          for k, ndim in layout}


def global_batch(setup: Setup, local_batch: dict) -> dict:
  """This process's numpy batch -> global jax.Arrays sharded over the mesh."""
  shardings = batch_shardings(setup, local_batch)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in local_batch.items()}


def _cast(params, dtype):
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating)
                      else p, params)


def make_loss_fn(setup: Setup, train: bool):
  """(params, batch, rng) -> (loss, metrics), computing in the compute dtype."""
  c = setup.config

  def loss_fn(params, batch, rng):
    model = nnx.merge(setup.graphdef, _cast(params, c.model.compute_dtype))
    return setup.task.loss(model, batch, rng, train)

  return loss_fn


def make_train_step(setup: Setup, batch_example: dict):
  """The jitted update: grads over micro-batches, clip, AdamW; state donated."""
  c = setup.config
  grad_fn = jax.value_and_grad(make_loss_fn(setup, train=True), has_aux=True)
  schedule = optim.schedule(c)
  m = c.train.microbatches

  def step_fn(state, batch):
    with parallel.axis_rules(setup.mesh, setup.rules):
      rng = jax.random.fold_in(jax.random.key(c.seed), state['step'])
      if m == 1:
        (_, metrics), grads = grad_fn(state['params'], batch, rng)
      else:
        micro = jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)

        def accumulate(grads_sum, i_and_mb):
          i, mb = i_and_mb
          (_, metrics), grads = grad_fn(state['params'], mb, jax.random.fold_in(rng, i))
          return jax.tree.map(jnp.add, grads_sum, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, state['params'])
        grads, metrics = jax.lax.scan(accumulate, zeros, (jnp.arange(m), micro))
        grads = jax.tree.map(lambda g: g / m, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
      updates, opt_state = setup.tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      metrics = {**metrics, 'grad_norm': optax.global_norm(grads),
                 'learning_rate': schedule(state['step'])}
      return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  if c.train.batch_size % m:
    raise ValueError(f'train.batch_size={c.train.batch_size} does not split into '
                     f'train.microbatches={m}')
  state_shardings = shardings_of(setup.abstract_state)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings(setup, batch_example)),
                 out_shardings=(state_shardings, parallel.replicated(setup.mesh)),
                 donate_argnums=0)


def make_eval_step(setup: Setup):
  """The jitted eval metrics of one batch (made and compiled once per Setup)."""
  return setup.once('eval_step', lambda: _eval_step(setup))


def _eval_step(setup: Setup):
  loss_fn = make_loss_fn(setup, train=False)

  def eval_fn(params, batch):
    with parallel.axis_rules(setup.mesh, setup.rules):
      return loss_fn(params, batch, jax.random.key(0))[1]

  return jax.jit(eval_fn, out_shardings=parallel.replicated(setup.mesh))


def evaluate_params(setup: Setup, params) -> dict[str, float]:
  """Mean eval metrics of this process's eval batches, then the task's own evaluation."""
  eval_step = make_eval_step(setup)
  batches = setup.task.eval_data(jax.process_index(), jax.process_count())
  results = [jax.device_get(eval_step(params, global_batch(setup, b))) for b in batches]
  model = nnx.merge(setup.graphdef, _cast(params, setup.config.model.compute_dtype))
  with parallel.axis_rules(setup.mesh, setup.rules):
    extra = setup.task.evaluate(model)
  return {**report.average(results), **extra}


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
      for pre_config, pre_dir, *_ in get_task(config).prerequisites(workdir).values():
        visit(pre_config, pre_dir, chain + (workdir,))
    if workdir not in seen:
      seen.add(workdir)
      order.append((config, workdir))

  visit(config, workdir, ())
  return order


def prerequisite_params(setup: Setup, workdir: str) -> dict:
  """The final params of each (already trained) prerequisite run, by subtree name."""
  params = {}
  for name, (config, run_dir, *source) in setup.task.prerequisites(workdir).items():
    if name not in setup.abstract_state['params']:
      names = sorted(setup.abstract_state['params'])
      raise ValueError(f'prerequisite {name!r} of {setup.config.experiment} is not a top-level '
                       f'parameter of its model; those are {names}')
    pre = build(config, setup.mesh)
    checkpoints = Checkpoints(run_dir, keep=config.checkpoint.keep, async_save=False)
    step, state = checkpoints.restore_newest(pre.abstract_state, log=report.log)
    checkpoints.close()
    if step is None:
      raise CheckpointError(f'prerequisite {name!r}: no checkpoint of {config.experiment} in '
                            f'{run_dir}; train it first')
    restored = state['params']
    if source:
      restored = restored[source[0]]
    target = setup.abstract_state['params'][name]
    if jax.tree.structure(restored) != jax.tree.structure(target):
      raise ValueError(f'prerequisite {name!r}: the params of {config.experiment} do not match '
                       f'{setup.config.experiment}/{name}')
    report.log(f'prerequisite {name}: {config.experiment} in {run_dir}, step {step}')
    params[name] = jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
                                restored, target)
  return params


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf; training stops."""


def _check_finite(step: int, metrics: dict, last_checkpoint):
  """The loss and the gradient norm must be finite; other metrics may be NaN on a step that
  had nothing for them to measure (report.average leaves those out)."""
  bad = {k: metrics[k] for k in ('loss', 'grad_norm')
         if k in metrics and not np.isfinite(metrics[k])}
  if bad:
    names = ', '.join(f'{k}={v}' for k, v in bad.items())
    raise NonFiniteError(f'non-finite {names} at step {step}; stopping. Newest checkpoint: '
                         f'step {last_checkpoint}')


def train(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, its prerequisite runs first (runs_to_train), each
  resuming from its newest checkpoint.

  Returns the last logged train metrics and the final eval metrics ('eval_*') of `config`.
  """
  results = {}
  for run_config, run_dir in runs_to_train(config, workdir):
    if run_dir != workdir:
      report.log(f'prerequisite run: {run_config.experiment} in {run_dir}')
    results = train_one(run_config, run_dir)
  return results


def train_one(config, workdir: str) -> dict:
  """Trains `config` in `workdir` alone, resuming from its newest checkpoint; from scratch,
  it starts from the final params of its prerequisite runs, which must be trained."""
  c = config
  os.makedirs(workdir, exist_ok=True)
  watch = watchdog.Watchdog(c, events.open_for(workdir))   # progress limits, events
  setup = build(c)
  report.log(f'mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} '
             f'devices, {jax.process_count()} process(es)')
  if 'BRAINSCALE_RUN_ID' in os.environ:   # set by the sbatch script; the same after a requeue
    report.log(f'run {os.environ["BRAINSCALE_RUN_ID"]}, SLURM job '
               f'{os.environ.get("SLURM_JOB_ID", "?")}, restart '
               f'{os.environ.get("SLURM_RESTART_COUNT", "0")}')
  checkpoints = Checkpoints(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
  data = setup.task.train_data(jax.process_index(), jax.process_count())
  with watch.phase('restore'):
    start, state = checkpoints.restore_newest(setup.abstract_state, data, log=report.log)
  if start is None:
    state = init_state(setup)
    state['params'].update(prerequisite_params(setup, workdir))
    step = 0
    report.log(f'starting {c.experiment} from scratch in {workdir}')
  else:
    step = int(jax.device_get(state['step']))
    report.log(f'resuming from step {step} ({checkpoints.directory / str(start)})')
  watch.ready(step)
  if step >= c.train.steps:
    watch.close()
    checkpoints.close()
    return _complete(setup, state, step, workdir)

  writer = report.Writer(workdir, c)
  goodput.write_scalars(writer, workdir, step)   # the attempts before this one
  first = watch.next(data)
  train_step = make_train_step(setup, first)
  profiler = profile.Profiler(c, workdir, step, log=report.log, hlo_text=lambda: train_step.lower(
      setup.abstract_state, global_batch(setup, first)).compile().as_text())
  progress = report.Progress(
      first_step=step, last_step=c.train.steps, batch_size=c.train.batch_size,
      flops_per_step=(setup.task.flops_per_example() * c.train.batch_size
                      if isinstance(setup.task, Costs) else 0.0),
      peak_flops=report.peak_flops_per_device(c), num_devices=jax.device_count())
  window, last = [], {}

  def finish(dispatched: list):
    """Host side of steps already dispatched: finite check, logging, TensorBoard.

    Metrics stay on the device until a log or checkpoint step, then come back in
    one transfer; a non-finite value is still reported with its exact step.
    """
    nonlocal last
    values = jax.device_get([m for _, m in dispatched])
    for (step_done, _), metrics in zip(dispatched, values):
      metrics = {k: float(v) for k, v in metrics.items()}
      _check_finite(step_done, metrics, checkpoints.latest())
      window.append(metrics)
      if step_done % c.train.log_every == 0 or step_done == c.train.steps:
        last = report.average(window)
        window.clear()
        rates = progress.rates(step_done)
        report.log(progress.line(step_done, last, rates))
        writer.scalars(step_done, {**{f'train/{k}': v for k, v in last.items()},
                                   **{f'perf/{k}': v for k, v in rates.items()}})
    dispatched.clear()

  pending, batch = [], first
  with preemption.Notice() as notice:
    while step < c.train.steps:
      state, metrics = train_step(state, global_batch(setup, batch))
      step += 1
      watch.step(step)
      profiler.step(step, state)
      # Read a logging step's metrics only once the next step is queued behind it.
      if pending and pending[-1][0] % c.train.log_every == 0:
        finish(pending)
      pending.append((step, metrics))
      preempted = notice.reached(step)   # every process, every step
      if preempted or step % c.checkpoint.every_steps == 0 or step == c.train.steps:
        finish(pending)  # never checkpoint a state whose loss is not finite
        with watch.phase('save', step):
          checkpoints.save(step, state, data, c, force=preempted)
      if preempted:
        with watch.phase('save', step):
          checkpoints.close()   # waits until the checkpoint is committed
        writer.close()
        report.log(f'SIGTERM: stopped at the agreed step {step}; checkpoint saved')
        raise preemption.Preempted(step)
      if c.train.eval_every and step % c.train.eval_every == 0 and step < c.train.steps:
        with watch.phase('eval', step):
          _eval_and_write(setup, state['params'], step, writer)
      if step < c.train.steps:
        batch = watch.next(data)
  finish(pending)
  with watch.phase('eval', step):
    final = _eval_and_write(setup, state['params'], step, writer)
  with watch.phase('save', step):
    checkpoints.close()
  watch.close()
  goodput.write_scalars(writer, workdir, step)
  writer.close()
  return {**last, **{f'eval_{k}': v for k, v in final.items()}}


def _complete(setup: Setup, state, step: int, workdir: str) -> dict:
  """A finished run: writes its final eval if a crash kept it from metrics.jsonl."""
  if not _eval_missing(workdir, step):
    report.log(f'step {step} >= train.steps={setup.config.train.steps}; nothing to do')
    return {}
  report.log(f'step {step} is trained but its final eval is missing from '
             f'{workdir}/metrics.jsonl; evaluating it now')
  writer = report.Writer(workdir, setup.config)
  final = _eval_and_write(setup, state['params'], step, writer)
  writer.close()
  return {f'eval_{k}': v for k, v in final.items()}


def _eval_missing(workdir: str, step: int) -> bool:
  """Whether metrics.jsonl holds no eval of `step` (process 0 reads, all agree)."""
  missing = False
  if jax.process_index() == 0:
    try:
      record = report.read_jsonl(os.path.join(workdir, 'metrics.jsonl')).get(step, {})
    except FileNotFoundError:
      record = {}
    missing = not any(k.startswith('eval/') for k in record)
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.array(missing)))
  return missing


def _eval_and_write(setup: Setup, params, step: int, writer: report.Writer) -> dict:
  start = time.perf_counter()
  metrics = evaluate_params(setup, params)
  report.log(f'eval step {step} | ' + ' | '.join(f'{k} {v:.4f}' for k, v in metrics.items())
             + f' | {time.perf_counter() - start:.1f}s')
  writer.scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  writer.flush()
  return metrics


def evaluate(config, workdir: str) -> dict:
  """Evaluates the newest checkpoint in `workdir`."""
  setup = build(config)
  checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=False)
  step, state = checkpoints.restore_newest(setup.abstract_state, log=report.log,
                                           set_aside=False)
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoints.directory}; train first')
  writer = report.Writer(workdir, config)
  metrics = _eval_and_write(setup, state['params'], step, writer)
  writer.close()
  checkpoints.close()
  return metrics
