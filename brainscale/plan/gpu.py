"""The GPUs brainscale is built for, and XLA's GPU compiler run without one.

`GPUS` describes each GPU type a `cluster.gpu` may name: the device description
XLA's compiler needs (compute capability, SMs, shared memory, HBM size and
bandwidth) and the peaks the speed estimate uses. With the CUDA plugin installed
(requirements-cuda.txt), `topology(cluster)` gives that cluster's GPUs as devices
of a topology -- no GPU present -- so a train step can be lowered for them and
compiled by XLA's real GPU compiler (cuBLAS gemms, cuDNN attention, Pallas
kernels through Triton and ptxas, NCCL collectives). Nothing runs.

Imports no JAX at module level (launch/slurm.py reads XLA_FLAGS from here).
"""

import dataclasses
import importlib.util

from brainscale.config import ConfigError

# XLA flags of every GPU job (BUILD.md section 3): overlap collectives with compute and
# combine them to about a layer's weights; XLA's own Triton gemms off (cuBLAS instead).
XLA_FLAGS = (
    '--xla_gpu_enable_latency_hiding_scheduler=true',
    '--xla_gpu_enable_while_loop_double_buffering=true',
    '--xla_gpu_enable_pipelined_all_gather=true',
    '--xla_gpu_enable_pipelined_reduce_scatter=true',
    '--xla_gpu_enable_pipelined_all_reduce=true',
    '--xla_gpu_all_gather_combine_threshold_bytes=536870912',
    '--xla_gpu_reduce_scatter_combine_threshold_bytes=536870912',
    '--xla_gpu_all_reduce_combine_threshold_bytes=536870912',
    '--xla_gpu_enable_triton_gemm=false',
)

_HOPPER = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
               shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132,
               fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
               block_dim_limit_z=65535, l2_cache_size=52428800, clock_rate_ghz=1.98,
               shared_memory_per_block_optin=232448, registers_per_core_limit=65536,
               registers_per_block_limit=65536)


@dataclasses.dataclass(frozen=True)
class GPU:
  """One GPU type: what XLA's compiler is told, and the peaks of the speed estimate."""
  name: str                 # as `cluster.gpu` names it
  description: str          # the device kind XLA and jax.devices() report
  hbm_bytes: int
  hbm_bandwidth: float      # bytes/s
  bf16_flops: float         # dense tensor-core peak, FLOP/s (also fp16)
  tf32_flops: float         # fp32 matmuls (XLA's default precision on GPU uses TF32)
  fp8_flops: float

  @property
  def hbm_gib(self) -> float:
    return self.hbm_bytes / 2 ** 30

  def target_config(self) -> str:
    """The GpuTargetConfig text proto XLA's GPU compiler takes in place of a real device."""
    info = dict(_HOPPER, memory_bandwidth=int(self.hbm_bandwidth),
                device_memory_size=self.hbm_bytes)
    fields = ' '.join(f'{k}: {v}' for k, v in info.items())
    return (f'gpu_device_info {{ {fields} cuda_compute_capability {{ major: 9 }} }} '
            'platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } '
            'runtime_version { major: 12 minor: 9 } '
            f'device_description_str: "{self.description}"')

  def peak_flops(self, dtype: str) -> float:
    """Matmul peak for operands of `dtype` (an HLO or numpy name)."""
    if dtype.startswith(('f8', 'float8')):
      return self.fp8_flops
    if dtype in ('f32', 'float32', 'f64', 'float64'):
      return self.tf32_flops
    return self.bf16_flops


# Datasheet figures (SXM parts): dense bf16 989.4 TFLOP/s, TF32 494.7, fp8 1978.9.
GPUS = {
    'H100-SXM-80GB': GPU('H100-SXM-80GB', 'NVIDIA H100 80GB HBM3', hbm_bytes=84_929_347_584,
                         hbm_bandwidth=3.35232e12, bf16_flops=989.4e12, tf32_flops=494.7e12,
                         fp8_flops=1978.9e12),
    'H200-SXM-141GB': GPU('H200-SXM-141GB', 'NVIDIA H200', hbm_bytes=150_754_820_096,
                          hbm_bandwidth=4.8e12, bf16_flops=989.4e12, tf32_flops=494.7e12,
                          fp8_flops=1978.9e12),
}


def spec(name: str) -> GPU:
  """The GPU a `cluster.gpu` value names."""
  if name not in GPUS:
    raise ConfigError(f'cluster.gpu={name!r} is not a GPU brainscale knows; known: '
                      f'{", ".join(GPUS)} (brainscale/plan/gpu.py:GPUS)')
  return GPUS[name]


def installed(module: str) -> bool:
  """Whether `module` (dotted names too) can be imported; False, not an error, when a
  parent package is missing. Imports only the parents."""
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:   # find_spec imports the parents; a missing one raises
    return False


def compiler_available() -> bool:
  """Whether JAX's CUDA plugin is installed (`make cuda`: requirements-cuda.txt): XLA's
  GPU compiler then runs here, with or without a GPU."""
  return any(installed(f'jax_plugins.xla_cuda{v}') for v in (12, 13))


def topology(cluster):
  """The cluster's GPUs (nodes x gpus_per_node) as compile-only JAX devices; no GPU needed."""
  from jax.experimental import topologies  # noqa: PLC0415  (no JAX at module level)
  gpu = spec(cluster.gpu)
  if cluster.gpus_per_node < 1:
    raise ConfigError(f'cluster.gpus_per_node={cluster.gpus_per_node}: a CPU job has no GPU '
                      'to compile for')
  try:
    return topologies.get_topology_desc(
        platform='cuda', target_config=gpu.target_config(),
        topology=f'1x{cluster.nodes}x{cluster.gpus_per_node}').devices
  except NotImplementedError as e:   # the CUDA backend was asked for and found no GPU
    raise ConfigError("JAX's CUDA plugin did not load (no GPU here?): compile for GPUs "
                      'with JAX_PLATFORMS=cpu') from e


def compiler_options() -> dict:
  """XLA_FLAGS as compile options (`lowered.compile(compiler_options=...)`), at XLA's default
  LLVM optimization level (3), which the cluster's jobs compile with, whatever the
  XLA_FLAGS of this process say (the tests lower it for XLA:CPU: tests/conftest.py)."""
  options = {'xla_backend_optimization_level': 3}
  for flag in XLA_FLAGS:
    key, value = flag.removeprefix('--').split('=')
    options[key] = {'true': True, 'false': False}.get(value, value)
  return options
