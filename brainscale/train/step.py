"""The train state and the jitted steps: what the loop, plan, inspect and the benchmarks build.

`build` resolves a config's task, mesh, optimizer and abstract train state; the
state is a plain tree {'params', 'opt_state', 'step'} in `model.param_dtype`
(fp32 by default), sharded by the logical-axis rules. The train step casts params
to `model.compute_dtype`, accumulates gradients over micro-batches, and is jitted
once with the state donated. Frozen prerequisites (train/prerequisites.py) get a
group of lr_scale 0 here, so an experiment names no freeze regex.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from brainscale import parallel
from brainscale.nn.core import axes_of
from brainscale.parallel import BATCH
from brainscale.train import optim, report
from brainscale.train.task import Task, get_task


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
  frozen = [name for name, pre in task.prerequisites().items() if pre.frozen]
  tx = optim.make(config, frozen)
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
  return {k: NamedSharding(setup.mesh, parallel.spec((BATCH,) + (None,) * (ndim - 1),
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
