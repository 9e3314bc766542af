"""`--mode=plan`: compile the real train step for the whole cluster on this CPU, and cost the run.

The train step that `train` would run is lowered for the experiment's full
mesh from abstract shapes (nothing is allocated) and compiled ahead of time.
Where to (`plan.target`, default `auto`):

- `gpu` (auto, when the CUDA plugin is installed: requirements-cuda.txt): for the
  cluster's GPUs themselves -- `cluster.nodes` x `cluster.gpus_per_node` devices of
  a GPU topology (brainscale/plan/gpu.py), no GPU needed -- by XLA's real GPU compiler
  with the cluster jobs' XLA flags. cuDNN attention stays cuDNN, Pallas kernels go
  through Triton and ptxas, collectives are NCCL's. It prints
  - `compiled_for`: what XLA compiled for (`192 x NVIDIA H100 80GB HBM3`);
  - `per_device_memory_gib`: XLA GPU's buffer assignment per device (arguments +
    outputs - donated aliases + temporaries), against `plan.hbm_fraction` of HBM:
    the CUDA context, NCCL's buffers and allocator fragmentation take the rest;
  - the kernels of one step per device by kind, with their FLOPs, HBM bytes and
    roofline time (brainscale/plan/hlo.py), and the collectives' bytes each GPU sends
    per step by kind and mesh axis, within a node (NVLink) or across (InfiniBand);
  - `predicted_step_s` and `predicted_mfu`, an *estimate*: kernels at their roofline
    (FLOPs at the matmul peak or bytes at HBM bandwidth, whichever is longer -- a
    lower bound on compute time) plus collectives at `cluster.nvlink_gbps` /
    `cluster.infiniband_gbps`, from fully hidden behind compute to not hidden at all.
  What a real GPU adds: gemm autotuning, cuDNN's run-time support checks, kernel
  launch gaps, achieved (not peak) throughput, NCCL's real overlap and congestion.
  benchmarks/gpu_check.sh measures a step beside this estimate.
- `cpu`: for as many simulated CPU devices (launch/run.py makes them before JAX
  starts). The same program partitioned the same way, so parameter, optimizer and
  gradient shards are exact. Three stand-ins keep the bytes close to the GPU's: the Pallas
  kernels (interpreted) for cuDNN, which cannot compile for a CPU; float16 for bfloat16
  compute (same size: XLA:CPU computes bf16 in f32 and keeps f32 copies of bf16 buffers,
  which doubled the saved residual stream); XLA:CPU's memory-first scheduler for its
  concurrency-first default. XLA GPU's fusion and workspaces still differ
  (benchmarks/RESULTS.md compares the two for the committed configs).

FLOPs: `model` FLOPs are the task's count (what MFU is quoted against); `compiled`
FLOPs are what the step computes, remat recomputation included: on GPU read from the
compiled HLO (gemms, cuDNN and Pallas attention), on CPU from the step's jaxpr with
scan bodies times their length.
"""

import dataclasses
import math
import time

import jax
from jax.extend import core as jax_core

from brainscale import parallel
from brainscale.config import ConfigError, cluster_devices
from brainscale.plan import collectives, hlo
from brainscale.plan import gpu as gpu_lib
from brainscale.train import goodput
from brainscale.train import step as step_lib
from brainscale.train.task import costs

GiB = 2 ** 30


@dataclasses.dataclass
class Plan:
  target: str                  # 'gpu' | 'cpu'
  compiled_for: str
  devices: int
  nodes: int
  mesh: dict
  attention: str
  compute_dtype: str           # as compiled (the CPU plan's float16 stands in for bfloat16)
  argument_gib: float
  output_gib: float
  alias_gib: float
  temp_gib: float
  compiled_flops: float        # per step, all devices, remat included: the GPU program's
                               # kernels (hlo), or on the CPU plan the jaxpr's count
  jaxpr_flops: float           # per step, all devices: the traced step's jaxpr, counted
  model_flops: float           # per step, all devices (the task's count)
  tokens_per_example: int      # the model's sequence length
  compile_s: float
  analysis: hlo.Analysis | None = None   # the GPU program's kernels and collectives

  @property
  def per_device_gib(self) -> float:
    return self.argument_gib + self.output_gib - self.alias_gib + self.temp_gib


# ----------------------------------------------------------------------------- jaxpr FLOPs

def dot_flops(eqn) -> float:
  """2 x (output elements) x (contracted size) of a dot_general."""
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def cudnn_attention_flops(eqn) -> float:
  """jax.nn.dot_product_attention's cuDNN primitives: forward 2 matmuls per visible pair,
  backward 5 (it recomputes QK^T)."""
  q, k = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  b, t, n, h = q if eqn.params.get('layout', 0) == 0 else (q[0], q[2], q[1], q[3])
  s = k[1] if eqn.params.get('layout', 0) == 0 else k[2]
  causal = 'CAUSAL' in str(eqn.params.get('mask_type', ''))
  pairs = hlo.attention_pairs(t, s, causal, eqn.params.get('sliding_window_length'))
  return 2.0 * (5 if 'bwd' in eqn.primitive.name else 2) * b * n * pairs * h


_CUDNN_ATTENTION = ('dot_product_attention_fwd_wrapper', 'dot_product_attention_bwd_wrapper')


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
  their cost estimate, cuDNN attention by its matmuls."""
  total = 0.0
  for eqn in live_eqns(jaxpr):
    name = eqn.primitive.name
    if name == 'dot_general':
      total += dot_flops(eqn)
    elif name in _CUDNN_ATTENTION:
      total += cudnn_attention_flops(eqn)
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
        total += jaxpr_flops(sub)   # jit, remat, custom_vjp, ...
  return total


# ----------------------------------------------------------------------------- compiling

def target(config) -> str:
  """'gpu' or 'cpu': what `plan.target` asks for (auto: gpu when the CUDA plugin is here)."""
  asked = config.plan.target
  if asked not in ('auto', 'gpu', 'cpu'):
    raise ConfigError(f"plan.target={asked!r}; expected 'auto', 'gpu' or 'cpu'")
  if asked == 'gpu' and not gpu_lib.compiler_available():
    raise ConfigError('plan.target=gpu needs the CUDA plugin of JAX: '
                      'pip install -r requirements-cuda.txt')
  if asked == 'auto':
    return 'cpu' if cpu_reason(config) else 'gpu'
  return asked


def cpu_reason(config) -> str:
  """Why `plan.target=auto` compiles on simulated CPU devices ('' when it compiles for GPUs)."""
  if config.plan.target == 'cpu':
    return 'plan.target=cpu'
  if config.cluster.gpus_per_node < 1:
    return f'cluster.gpus_per_node={config.cluster.gpus_per_node}: the cluster has no GPUs'
  if not gpu_lib.compiler_available():
    return ("JAX's CUDA plugin is not installed; `make cuda` (requirements-cuda.txt, ~5.5 GB) "
            "adds it, and plan then compiles with XLA's GPU compiler, no GPU needed")
  return ''


# XLA:CPU's default scheduler orders ops for concurrency and keeps more alive; its
# memory-first order is the closer stand-in for XLA GPU's, which schedules to a memory limit.
# In XLA_FLAGS before JAX starts (launch/run.py): as a compile option it reaches only part of
# the pipeline (cwm_80b 50.0 GiB per device, against 44.3 from the flag).
CPU_XLA_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def _plan_config(config):
  """The config as the CPU plan compiles it: cudnn attention becomes the Pallas kernels (and
  'save_attention', which saves nothing of cuDNN's, becomes 'full', as on the GPU); bfloat16
  compute becomes float16, the same bytes: XLA:CPU computes bf16 in f32 and keeps f32 copies
  of bf16 buffers (its float-normalization pass), f16 ones it keeps as they are."""
  planned = config.copy_and_resolve_references()
  with planned.unlocked():
    if planned.model.get('attention') == 'cudnn':
      planned.model.attention = 'pallas'
      if planned.model.get('remat') == 'save_attention':
        planned.model.remat = 'full'
    if planned.model.get('compute_dtype') == 'bfloat16':
      planned.model.compute_dtype = 'float16'
  return planned


def compile_step(config, where: str) -> Plan:
  """AOT-compiles the train step of `config` for its cluster: on its GPUs ('gpu') or on
  jax.devices() standing in for them ('cpu')."""
  nodes = config.cluster.nodes
  if where == 'gpu':
    devices, planned, options = gpu_lib.topology(config.cluster), config, gpu_lib.compiler_options()
  else:
    devices, planned, options = jax.devices(), _plan_config(config), None
  mesh = parallel.make_mesh(config.mesh, devices, nodes=nodes)
  setup = step_lib.build(planned, mesh)
  batch = setup.task.batch_shapes(planned.train.batch_size)
  step = step_lib.make_train_step(setup, batch)
  shardings = step_lib.batch_shardings(setup, batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
           for k, v in batch.items()}
  start = time.perf_counter()
  traced = step.trace(setup.abstract_state, batch)
  compiled = traced.lower().compile(compiler_options=options)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  attention = config.model.get('attention', 'xla')
  counted = jaxpr_flops(traced.jaxpr.jaxpr)
  if where == 'gpu':
    analysis = hlo.analyze(compiled.as_text(), collectives.Layout.of_mesh(mesh))
    compiled_for = f'{len(devices)} x {devices[0].device_kind}'
    compiled_flops = analysis.flops() * len(devices)
  else:
    analysis = None
    compiled_for = f'{len(devices)} simulated CPU devices'
    compiled_flops = counted
    if planned.model.get('attention') != attention:
      attention += ' (planned as pallas, interpreted)'
  return Plan(
      target=where, compiled_for=compiled_for, devices=len(devices), nodes=nodes,
      mesh={a: n for a, n in mesh.shape.items() if n > 1}, attention=attention,
      compute_dtype=planned.model.get('compute_dtype', ''),
      argument_gib=memory.argument_size_in_bytes / GiB,
      output_gib=memory.output_size_in_bytes / GiB,
      alias_gib=memory.alias_size_in_bytes / GiB,
      temp_gib=memory.temp_size_in_bytes / GiB,
      compiled_flops=compiled_flops, jaxpr_flops=counted,
      model_flops=costs(setup.task).flops_per_example() * config.train.batch_size,
      tokens_per_example=costs(setup.task).tokens_per_example(),
      compile_s=compile_s, analysis=analysis)


# ----------------------------------------------------------------------------- the report

@dataclasses.dataclass
class Estimate:
  """A step's predicted time on the GPUs, from the compiled program (an estimate)."""
  compute_s: float             # kernels at their roofline: a lower bound
  collective_s: float          # collectives back to back at the stated link bandwidths
  model_flops_per_device: float
  peak: float                  # FLOP/s per device that MFU is quoted against

  @property
  def step_s(self) -> tuple[float, float]:
    """(collectives fully hidden behind compute, not hidden at all)."""
    return max(self.compute_s, self.collective_s), self.compute_s + self.collective_s

  @property
  def mfu(self) -> tuple[float, float]:
    """MFU at the two ends of step_s, the slower first."""
    fast, slow = self.step_s
    return (self.model_flops_per_device / (slow * self.peak),
            self.model_flops_per_device / (fast * self.peak))


def estimate(config, plan: Plan) -> Estimate:
  cl, gpu = config.cluster, gpu_lib.spec(config.cluster.gpu)
  a = plan.analysis
  return Estimate(compute_s=a.compute_seconds(gpu),
                  collective_s=a.collective_seconds(cl.nvlink_gbps * 1e9, cl.infiniband_gbps * 1e9),
                  model_flops_per_device=plan.model_flops / plan.devices,
                  peak=config.train.peak_tflops * 1e12)


def _gpu_lines(config, plan: Plan) -> list[str]:
  cl, gpu = config.cluster, gpu_lib.spec(config.cluster.gpu)
  a, est = plan.analysis, estimate(config, plan)
  lines = [f'kernels per step per device (roofline: FLOPs at the {gpu.bf16_flops / 1e12:.0f} '
           f'TFLOP/s bf16 peak or bytes at {gpu.hbm_bandwidth / 1e12:.2f} TB/s, whichever is '
           'longer):',
           f'  {"kind":34s} {"launches":>9s} {"TFLOP":>9s} {"GB":>9s} {"ms":>9s}']
  for kind, row in sorted(a.by_kind(gpu).items(), key=lambda kv: -kv[1]['seconds']):
    lines.append(f'  {kind:34s} {row["launches"]:9.0f} {row["flops"] / 1e12:9.2f} '
                 f'{row["bytes"] / 1e9:9.1f} {row["seconds"] * 1e3:9.1f}')
  links = {'NVLink': cl.nvlink_gbps, 'InfiniBand': cl.infiniband_gbps}
  lines.append(f'collectives per step per device (bytes each GPU sends; NVLink {cl.nvlink_gbps:g} '
               f'GB/s, InfiniBand {cl.infiniband_gbps:g} GB/s per GPU per direction):')
  totals = {'NVLink': 0.0, 'InfiniBand': 0.0}
  for (op, axes, link), b in sorted(a.collective_bytes().items(), key=lambda kv: -kv[1]):
    totals[link] += b
    lines.append(f'  {op:20s} {axes:18s} {link:10s} {b / 1e9:10.2f} GB '
                 f'{b / (links[link] * 1e9) * 1e3:9.1f} ms')
  fast, slow = est.step_s
  low, high = est.mfu
  lines += [
      f'collective_gb_nvlink: {totals["NVLink"] / 1e9:.2f}',
      f'collective_gb_infiniband: {totals["InfiniBand"] / 1e9:.2f}',
      f'predicted_compute_s: {est.compute_s:.3f}  (roofline: a lower bound on kernel time)',
      f'predicted_collective_s: {est.collective_s:.3f}  (all collectives back to back)',
      f'predicted_step_s: {fast:.3f} .. {slow:.3f}  (estimate: collectives hidden .. not hidden)',
      f'predicted_mfu: {low:.3f} .. {high:.3f}  (estimate, of {config.train.peak_tflops:g} '
      'TFLOP/s; a real GPU reaches below its roofline)',
  ]
  lines += [f'warning: {w}' for w in a.warnings]
  return lines


def report(config, plan: Plan) -> tuple[str, bool]:
  """The plan as text, and whether it fits."""
  p, cl = config.plan, config.cluster
  hbm_gib = gpu_lib.spec(cl.gpu).hbm_gib
  budget = p.hbm_fraction * hbm_gib
  fits = plan.per_device_gib <= budget
  peak = config.train.peak_tflops * 1e12
  step_s = plan.model_flops / (plan.devices * peak * p.mfu)
  examples_per_day = config.train.batch_size * 86400 / step_s
  tokens = config.train.batch_size * plan.tokens_per_example
  gpu_hours = plan.devices * 24 * p.days
  steps_in_campaign = p.days * 86400 / step_s
  how = ("XLA's GPU compiler on this CPU, no GPU present" if plan.target == 'gpu' else
         "CPU stand-ins: their memory has come within -2..+7 GiB of XLA GPU's for the "
         'committed configs; `make cuda` to compile for the GPUs')
  lines = [
      f'plan: {config.experiment} on {plan.nodes} nodes x {cl.gpus_per_node} {cl.gpu} '
      f'= {plan.devices} devices, mesh {plan.mesh}',
      f'compiled_for: {plan.compiled_for}  ({how})',
      f'attention: {plan.attention}  compute: {plan.compute_dtype}  '
      f'remat: {config.model.get("remat", "")}  '
      f'microbatches: {config.train.microbatches}',
      f'compile_s: {plan.compile_s:.1f}',
      f'memory per device ({"XLA GPU" if plan.target == "gpu" else "XLA CPU"} buffer assignment '
      'of the compiled step):',
      f'  arguments {plan.argument_gib:9.2f} GiB  (params, optimizer state, batch shard)',
      f'  outputs   {plan.output_gib:9.2f} GiB  (of which {plan.alias_gib:.2f} GiB alias the '
      'donated state)',
      f'  temps     {plan.temp_gib:9.2f} GiB  (activations, remat, gathered weights)',
      f'per_device_memory_gib: {plan.per_device_gib:.2f}  (budget {budget:.1f} = '
      f'{p.hbm_fraction} x {hbm_gib:.1f} GiB HBM)',
      f'model_flops_per_step: {plan.model_flops:.4g}',
      f'compiled_flops_per_step: {plan.compiled_flops:.4g}  '
      f'({plan.compiled_flops / max(plan.model_flops, 1):.2f}x model; '
      f'{"read from the GPU HLO" if plan.target == "gpu" else "matmuls of the jaxpr"}, '
      'remat included)',
  ]
  if plan.target == 'gpu':
    lines += _gpu_lines(config, plan)
  lines += [
      f'step_time_s: {step_s:.2f}  (at {p.mfu:.0%} MFU of {config.train.peak_tflops:g} TFLOP/s)',
      f'examples_per_day: {examples_per_day:.4g}',
      f'tokens_per_day: {tokens * 86400 / step_s:.4g}  ({tokens} tokens per step)',
      f'train.steps={config.train.steps}: {config.train.steps * step_s / 86400:.1f} days',
      f'campaign of {p.days:g} days: {steps_in_campaign:.4g} steps, {gpu_hours:,.0f} GPU-hours, '
      f'${gpu_hours * p.usd_per_gpu_hour:,.0f} at ${p.usd_per_gpu_hour}/GPU-hour',
      *goodput.plan_lines(config, step_s, plan.devices),
      f'fits: {"yes" if fits else "no"}',
  ]
  return '\n'.join(lines), fits


def plan(config, where: str) -> tuple[str, bool]:
  check(config)
  return report(config, compile_step(config, where))


def check(config):
  if 'cluster' not in config:
    raise ConfigError(f'{config.experiment} has no cluster section; plan mode plans a cluster '
                      'run (experiments with one: cwm_1b, cwm_80b, enigma_1b, ...)')
  gpu_lib.spec(config.cluster.gpu)


def simulated_devices(config) -> int:
  """How many CPU devices the CPU plan of `config` needs (set before JAX starts)."""
  if 'cluster' not in config:
    return 1
  return cluster_devices(config.cluster)
