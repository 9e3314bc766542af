"""The probe plan: will a world model's probes fit and how fast do they run on its inference GPUs.

  python launch/run.py --experiment=cwm_80b --mode=probe_plan [--config.inference.batch=N]

The counterpart of --mode=plan for inference: the KV-cached decode step (one token per
example against a full cache) and the prefill (frame 0 into the cache) of a CWM world
model, its params in inference.dtype laid out as inspect.load lays them out
(inference.tensor GPUs of the cluster's type, heads/MLP/vocab split over them), compiled
by XLA's GPU compiler on this CPU (needs the CUDA plugin; nothing runs). Per GPU: weights,
cache per example at the full sequence, temp, how many examples fit in plan.hbm_fraction
of HBM, and the roofline of the compiled kernels and collectives (brainscale/hlo.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from brainscale import inspect, parallel
from brainscale.config import ConfigError
from brainscale.cwm.model import WorldModel
from brainscale.plan import gpu as gpu_lib
from brainscale.plan import hlo
from brainscale.train.task import get_task

GiB = 2 ** 30


@dataclasses.dataclass
class Compiled:
  """One compiled function: XLA's memory plan per GPU and its HLO analysis."""
  tokens: int                  # fed per example
  argument_bytes: int
  temp_bytes: int
  analysis: hlo.Analysis

  def ms(self, gpu, nvlink: float) -> float:
    """Kernels at their roofline, then the collectives back to back at NVLink bandwidth."""
    return 1e3 * (self.analysis.compute_seconds(gpu) +
                  self.analysis.collective_seconds(nvlink, nvlink))

  def gathered_bytes(self) -> float:
    """The largest array an all-gather assembles (bytes), 0 if none."""
    return max((c.payload * c.group for c in self.analysis.collectives
                if c.op == 'all-gather'), default=0.0)


@dataclasses.dataclass
class ProbePlan:
  experiment: str
  gpus: int
  gpu: gpu_lib.GPU
  dtype: str
  batch: int                   # examples compiled for
  slots: int                   # cache slots: the whole two-frame sequence
  patches: int                 # per frame
  weights_bytes: float         # per GPU
  cache_bytes: float           # per example per GPU
  smallest_weight_bytes: float  # the smallest weight matrix of one layer, whole
  decode: Compiled
  prefill: Compiled
  hbm_fraction: float
  nvlink: float                # bytes/s per GPU

  @property
  def temp_bytes(self) -> float:
    return max(self.decode.temp_bytes, self.prefill.temp_bytes)

  def budget(self) -> float:
    return self.hbm_fraction * self.gpu.hbm_bytes

  def used_bytes(self) -> float:
    """Weights, the batch's full caches and the larger temp, per GPU."""
    return self.weights_bytes + self.batch * self.cache_bytes + self.temp_bytes

  def examples_that_fit(self) -> int:
    """Examples per model copy within the budget (temp scaled with the batch)."""
    per_example = self.cache_bytes + self.temp_bytes / self.batch
    return max(0, math.floor((self.budget() - self.weights_bytes) / per_example))

  def fits(self) -> bool:
    return self.used_bytes() <= self.budget()

  def weights_gathered(self) -> bool:
    """Whether the decode step all-gathers anything as large as a layer's weight."""
    return self.decode.gathered_bytes() >= self.smallest_weight_bytes

  def token_ms(self) -> float:
    return self.decode.ms(self.gpu, self.nvlink)

  def frame_ms(self) -> float:
    """A whole frame 1 predicted sequentially: frame 0 prefilled, then 4 steps per patch."""
    return self.prefill.ms(self.gpu, self.nvlink) + 4 * self.patches * self.token_ms()

  def report(self) -> str:
    g = lambda b: f'{b / GiB:.2f} GiB'
    return '\n'.join([
        f'probe plan of {self.experiment}: {self.gpus} x {self.gpu.description}, params '
        f'{self.dtype} split over tensor={self.gpus}, batch {self.batch}, '
        f'{self.slots}-slot KV cache',
        f'weights per GPU: {g(self.weights_bytes)}',
        f'cache per example per GPU: {g(self.cache_bytes)} ({self.slots} slots)',
        f'temp per GPU: {g(self.temp_bytes)} (decode {g(self.decode.temp_bytes)}, prefill '
        f'{self.prefill.tokens} tokens {g(self.prefill.temp_bytes)})',
        f'per_gpu_memory_gib: {self.used_bytes() / GiB:.2f} of {g(self.budget())} '
        f'({self.hbm_fraction:g} x {self.gpu.hbm_gib:.1f} GiB)',
        f'examples that fit: {self.examples_that_fit()}',
        f'fits: {"yes" if self.fits() else "no"}',
        f'all-gathers in the decode step: largest {self.decode.gathered_bytes() / 2 ** 20:.3f} '
        f'MiB; weights gathered: {"yes" if self.weights_gathered() else "no"}',
        f'roofline ms per decoded token: {self.token_ms():.3f} (batch {self.batch}: '
        f'{self.token_ms() / self.batch:.3f} per example)',
        f'roofline ms per prefill: {self.prefill.ms(self.gpu, self.nvlink):.2f}',
        f'roofline ms per whole-frame prediction: {self.frame_ms():.1f} (sequential: prefill '
        f'+ {4 * self.patches} one-token steps)',
    ])


def inference_cluster(config) -> ml_collections.ConfigDict:
  """One node of inference.tensor GPUs of the experiment's GPU type."""
  cluster = config.get('cluster', None)
  return ml_collections.ConfigDict(dict(
      nodes=1, gpus_per_node=config.inference.tensor,
      gpu=cluster.gpu if cluster is not None else 'H100-SXM-80GB',
      nvlink_gbps=cluster.nvlink_gbps if cluster is not None else 450.0))


def _compile(step, params, cache, tokens: int, batch: int, mesh) -> Compiled:
  tokens_BxT = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
  pos_BxTx3 = jax.ShapeDtypeStruct((batch, tokens, 3), jnp.float32)
  compiled = jax.jit(step, donate_argnums=1).trace(params, cache, tokens_BxT, pos_BxTx3).lower(
  ).compile(compiler_options=gpu_lib.compiler_options())
  memory = compiled.memory_analysis()
  return Compiled(tokens, memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                  hlo.analyze(compiled.as_text(), hlo.Layout.of_mesh(mesh)))


def probe_plan(config) -> ProbePlan:
  """Compiles the decode step and the prefill of `config`'s world model for its GPUs."""
  if not gpu_lib.compiler_available():
    raise ConfigError("--mode=probe_plan compiles for GPUs and needs JAX's CUDA plugin: "
                      'pip install -r requirements-cuda.txt (make cuda)')
  task = get_task(config)
  cluster = inference_cluster(config)
  devices = gpu_lib.topology(cluster)
  mesh = parallel.inference_mesh(len(devices), devices)
  dtype = inspect.params_dtype(config.inference.dtype)
  graphdef, params = inspect.abstract_params(task, mesh, dtype)
  model = nnx.merge(graphdef, params)
  if not isinstance(model, WorldModel):
    raise ConfigError(f'--mode=probe_plan plans the probes of a CWM world model; '
                      f'{config.experiment} is a {type(model).__name__}')
  rules = parallel.inference_rules(config.mesh.rules)
  layout, batch = model.layout, config.inference.batch
  if batch < 1:
    raise ConfigError(f'inference.batch={batch}; expected examples >= 1')

  def step(params, cache, tokens_BxT, pos_BxTx3):
    with parallel.axis_rules(mesh, rules):
      model = nnx.merge(graphdef, params)
      x_BxTxD, cache = model.decode(tokens_BxT, pos_BxTx3, cache)
      return model.content_logits(x_BxTxD[:, -1:]), cache

  def empty_cache():
    with parallel.axis_rules(mesh, rules):
      return nnx.merge(graphdef, params).init_cache(batch, layout.length, dtype)

  shardings = jax.jit(empty_cache).lower().compile().output_shardings
  cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       jax.eval_shape(empty_cache), shardings)
  k = cache.k_LxBxSxKxH
  shard = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
  matrices = [a for a in jax.tree.leaves(params['blocks']['layers']) if a.ndim >= 3]
  frame0 = layout.length // layout.frames
  return ProbePlan(
      experiment=config.experiment, gpus=len(devices), gpu=gpu_lib.spec(cluster.gpu),
      dtype=dtype.name, batch=batch, slots=layout.length, patches=layout.patches,
      weights_bytes=sum(shard(a) for a in jax.tree.leaves(params)),
      cache_bytes=2 * shard(k) / batch,
      smallest_weight_bytes=min(math.prod(a.shape[1:]) * a.dtype.itemsize for a in matrices),
      decode=_compile(step, params, cache, 1, batch, mesh),
      prefill=_compile(step, params, cache, frame0, batch, mesh),
      hbm_fraction=config.plan.hbm_fraction, nvlink=cluster.nvlink_gbps * 1e9)
