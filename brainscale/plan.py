"""`--mode=plan`: compile the real train step for the whole cluster on this CPU, and cost the run.

launch/run.py starts JAX with one simulated CPU device per GPU of the
experiment's `cluster` (192 for cwm_80b) before anything else touches JAX.
The train step that `train` would run is then lowered for that mesh from
abstract shapes (nothing is allocated) and compiled ahead of time; XLA's SPMD
partitioner produces the per-device program and its buffer assignment gives,
per device: arguments (this device's shard of params, optimizer state and
batch), outputs, and temporaries (activations kept for the backward, remat
buffers, gathered weights, collective buffers). Donated state aliases the
output and is counted once.

How this relates to memory on the GPU:
- It is the same program, partitioned the same way, so the parameter,
  optimizer and gradient shards are exact, and activations are what the
  GPU keeps too (same remat policy, same micro-batching).
- Attention: `cudnn` cannot compile for a CPU, so the plan compiles the Pallas
  flash kernels in its place (interpreted). Both keep only the output and the
  log-sum-exp for the backward; the interpreter carries whole output arrays
  through its loop, so its temporaries are an upper bound. `xla` attention is
  planned as is ([T, S] scores per head: usually what does not fit).
- The GPU compiler schedules differently: the latency-hiding scheduler keeps
  the next layer's all-gathered weights alive while this one computes (about
  one layer's weights extra), cuBLAS/cuDNN take workspaces, NCCL and the CUDA
  context take about 1-2 GiB, and the allocator fragments. Hence `fits` compares
  against `plan.hbm_fraction` (0.8) of the GPU's HBM, not all of it.

FLOPs: XLA's cost analysis counts a loop body once (a scanned 96-layer stack
would count one layer), so the step's FLOPs are counted here from its jaxpr,
multiplying scan bodies by their length; `compiled` FLOPs include the remat
recomputation, `model` FLOPs (the task's count, what MFU is quoted against) do not.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from brainscale import parallel
from brainscale.train import loop

GiB = 2 ** 30


@dataclasses.dataclass
class Plan:
  devices: int
  nodes: int
  mesh: dict
  attention: str
  argument_gib: float
  output_gib: float
  alias_gib: float
  temp_gib: float
  compiled_flops: float        # per step, all devices, remat included
  model_flops: float           # per step, all devices (the task's count)
  tokens_per_example: int      # the model's sequence length
  compile_s: float

  @property
  def per_device_gib(self) -> float:
    return self.argument_gib + self.output_gib - self.alias_gib + self.temp_gib


def dot_flops(eqn) -> float:
  """2 x (output elements) x (contracted size) of a dot_general."""
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def live_eqns(jaxpr) -> list:
  """The equations whose results reach the jaxpr's outputs (or that have effects); XLA drops
  the rest, e.g. a remat body's recomputation of a value the policy saved."""
  live = {id(v) for v in jaxpr.outvars}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(id(v) in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(id(v) for v in eqn.invars)
  return kept[::-1]


def jaxpr_flops(jaxpr) -> float:
  """Matmul FLOPs of a jaxpr's live equations: scans times their length, Pallas calls by
  their cost estimate."""
  total = 0.0
  for eqn in live_eqns(jaxpr):
    name = eqn.primitive.name
    if name == 'dot_general':
      total += dot_flops(eqn)
    elif name == 'scan':
      total += eqn.params['length'] * jaxpr_flops(eqn.params['jaxpr'].jaxpr)
    elif name == 'pallas_call':
      estimate = eqn.params.get('cost_estimate')
      total += float(estimate.flops) if estimate is not None else 0.0
    elif name == 'shard_map':   # the body runs on every device, on its shard
      total += eqn.params['mesh'].size * jaxpr_flops(eqn.params['jaxpr'])
    elif name == 'cond':
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params['branches'])
    else:
      for sub in jax_core.jaxprs_in_params(eqn.params):
        total += jaxpr_flops(sub)   # jit, remat, custom_vjp, shard_map, ...
  return total


def _plan_config(config):
  """The config as the plan compiles it: cudnn attention becomes the Pallas kernels (and
  'save_attention', which saves nothing of cuDNN's, becomes 'full', as on the GPU)."""
  planned = config.copy_and_resolve_references()
  if planned.model.get('attention') == 'cudnn':
    with planned.unlocked():
      planned.model.attention = 'pallas'
      if planned.model.get('remat') == 'save_attention':
        planned.model.remat = 'full'
  return planned


def compile_step(config) -> Plan:
  """AOT-compiles the train step of `config` for its cluster on jax.devices()."""
  nodes = config.cluster.nodes
  devices = jax.devices()
  mesh = parallel.make_mesh(config.mesh, devices, nodes=nodes)
  planned = _plan_config(config)
  setup = loop.build(planned, mesh)
  batch = setup.task.batch_shapes(planned.train.batch_size)
  step = loop.make_train_step(setup, batch)
  shardings = loop.batch_shardings(setup, batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
           for k, v in batch.items()}
  start = time.perf_counter()
  traced = step.trace(setup.abstract_state, batch)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return Plan(
      devices=len(devices), nodes=nodes,
      mesh={a: n for a, n in mesh.shape.items() if n > 1},
      attention=config.model.get('attention', 'xla') + (
          ' (planned as pallas, interpreted)' if planned.model.get('attention') !=
          config.model.get('attention') else ''),
      argument_gib=memory.argument_size_in_bytes / GiB,
      output_gib=memory.output_size_in_bytes / GiB,
      alias_gib=memory.alias_size_in_bytes / GiB,
      temp_gib=memory.temp_size_in_bytes / GiB,
      compiled_flops=jaxpr_flops(traced.jaxpr.jaxpr),
      model_flops=setup.task.flops_per_example() * config.train.batch_size,
      tokens_per_example=setup.task.tokens_per_example(),
      compile_s=compile_s)


def report(config, plan: Plan) -> tuple[str, bool]:
  """The plan as text, and whether it fits."""
  p, cl = config.plan, config.cluster
  budget = p.hbm_fraction * cl.hbm_gib
  fits = plan.per_device_gib <= budget
  peak = config.train.peak_tflops * 1e12
  step_s = plan.model_flops / (plan.devices * peak * p.mfu)
  examples_per_day = config.train.batch_size * 86400 / step_s
  tokens = config.train.batch_size * plan.tokens_per_example
  gpu_hours = plan.devices * 24 * p.days
  steps_in_campaign = p.days * 86400 / step_s
  lines = [
      f'plan: {config.experiment} on {plan.nodes} nodes x {cl.gpus_per_node} {cl.gpu} '
      f'= {plan.devices} devices, mesh {plan.mesh}',
      f'attention: {plan.attention}',
      f'compile_s: {plan.compile_s:.1f}  (AOT, {plan.devices} simulated CPU devices)',
      'memory per device (XLA buffer assignment of the compiled step):',
      f'  arguments {plan.argument_gib:9.2f} GiB  (params, optimizer state, batch shard)',
      f'  outputs   {plan.output_gib:9.2f} GiB  (of which {plan.alias_gib:.2f} GiB alias the '
      'donated state)',
      f'  temps     {plan.temp_gib:9.2f} GiB  (activations, remat, gathered weights)',
      f'per_device_memory_gib: {plan.per_device_gib:.2f}  (budget {budget:.1f} = '
      f'{p.hbm_fraction} x {cl.hbm_gib} GiB HBM)',
      f'model_flops_per_step: {plan.model_flops:.4g}',
      f'compiled_flops_per_step: {plan.compiled_flops:.4g}  (matmuls incl. remat; '
      f'{plan.compiled_flops / max(plan.model_flops, 1):.2f}x model)',
      f'step_time_s: {step_s:.2f}  (at {p.mfu:.0%} MFU of {config.train.peak_tflops:g} TFLOP/s)',
      f'examples_per_day: {examples_per_day:.4g}',
      f'tokens_per_day: {tokens * 86400 / step_s:.4g}  ({tokens} tokens per step)',
      f'train.steps={config.train.steps}: {config.train.steps * step_s / 86400:.1f} days',
      f'campaign of {p.days:g} days: {steps_in_campaign:.4g} steps, {gpu_hours:,.0f} GPU-hours, '
      f'${gpu_hours * p.usd_per_gpu_hour:,.0f} at ${p.usd_per_gpu_hour}/GPU-hour',
      f'fits: {"yes" if fits else "no"}',
  ]
  return '\n'.join(lines), fits


def plan(config) -> tuple[str, bool]:
  if 'cluster' not in config:
    raise ValueError(f'{config.experiment} has no cluster section; plan mode plans a cluster run '
                     '(experiments with one: cwm_1b, cwm_80b, enigma_1b, ...)')
  return report(config, compile_step(config))


def simulated_devices(config) -> int:
  """How many CPU devices the plan of `config` needs (set before JAX starts)."""
  if 'cluster' not in config:
    return 1
  return config.cluster.nodes * max(config.cluster.gpus_per_node, 1)
