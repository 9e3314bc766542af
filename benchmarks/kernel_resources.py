# python benchmarks/kernel_resources.py [--shapes=cwm_10k,enigma_local,...] [--gpu=H100-SXM-80GB]
"""The Pallas flash-attention kernels compiled for Hopper (sm_90a) at the models' tiles.

For each attention shape of benchmarks/shapes.py (the models' head dims, masks and
GQA; tiles: kernels/flash_attention.Blocks), forward + backward is compiled by XLA's
GPU compiler on this CPU (CUDA plugin, no GPU): Pallas lowers each kernel through
Triton to sm_90a PTX, written to an XLA dump. `ptxas -v -arch=sm_90a` (from the
nvidia-cuda-nvcc wheel that jax[cuda12] installs) gives each kernel's registers per
thread, spill stores and loads and stack frame; XLA's thunk sequence its threads per
block and dynamic shared memory. Blocks per SM is what registers and shared memory
allow. A spill (registers that do not fit, moved to local memory) costs time in the
inner loop; tests/test_gpu_compile.py fails on one.
"""

import dataclasses
import glob
import os
import pathlib
import re
import subprocess
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # compiles for a GPU topology; needs none

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import shapes
from brainscale.plan import gpu
from experiments import base
from kernels import flash_attention

flags.DEFINE_list('shapes', ['cwm_10k', 'cwm_1b_10k', 'enigma_local', 'enigma_global',
                             'enigma_read', 'enigma_decode'], 'shapes of benchmarks/shapes.py')
flags.DEFINE_string('gpu', 'H100-SXM-80GB', 'a GPU of brainscale/plan/gpu.py:GPUS')
FLAGS = flags.FLAGS

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 233472        # bytes, H100/H200 (228 KiB; 227 KiB per block at most)


@dataclasses.dataclass
class Resources:
  kernel: str
  registers: int              # per thread
  spill_stores: int           # bytes
  spill_loads: int
  stack: int                  # bytes of stack frame per thread
  threads: int                # per block
  shared: int                 # dynamic shared memory per block, bytes

  @property
  def blocks_per_sm(self) -> int:
    by_registers = REGISTERS_PER_SM // max(self.registers * self.threads, 1)
    by_shared = SHARED_PER_SM // self.shared if self.shared else by_registers
    return min(by_registers, by_shared)


def ptxas() -> str:
  """ptxas of the nvidia-cuda-nvcc wheel (pip install -r requirements-cuda.txt)."""
  import nvidia  # noqa: PLC0415  (the CUDA wheels are optional)
  found = [p for d in nvidia.__path__ for p in glob.glob(f'{d}/cuda_nvcc/bin/ptxas')]
  if not found:
    raise FileNotFoundError('ptxas not found in the nvidia-cuda-nvcc wheel; '
                            'pip install -r requirements-cuda.txt')
  return found[0]


def _ptxas_report(path: str) -> dict:
  out = subprocess.run([ptxas(), '-v', '-arch=sm_90a', path, '-o', '/dev/null'],
                       capture_output=True, text=True, check=True).stderr
  report = {}
  for entry in re.split(r"Compiling entry function '", out)[1:]:
    name = entry.split("'")[0]
    num = lambda pattern: int(re.search(pattern, entry).group(1))
    report[name] = dict(registers=num(r'Used (\d+) registers'),
                        spill_stores=num(r'(\d+) bytes spill stores'),
                        spill_loads=num(r'(\d+) bytes spill loads'),
                        stack=num(r'(\d+) bytes stack frame'))
  return report


def _launches(directory: str) -> dict:
  """Kernel name -> (threads per block, dynamic shared memory) from XLA's thunk sequence."""
  launches = {}
  for path in glob.glob(f'{directory}/*thunk_sequence.txt'):
    for m in re.finditer(r' (\w+) grid: \[[\d, ]+\] threads: \[(\d+), (\d+), (\d+)\]\s+'
                         r'shared_memory: (\d+) bytes', pathlib.Path(path).read_text()):
      launches[m.group(1)] = (int(m.group(2)) * int(m.group(3)) * int(m.group(4)),
                              int(m.group(5)))
  return launches


def resources(shape: shapes.Shape, gpu_name: str = 'H100-SXM-80GB') -> list[Resources]:
  """Compiles the shape's flash attention forward + backward for the GPU; each kernel's use."""
  device = gpu.topology(base.cluster(nodes=1, gpus_per_node=1, time_limit='1:00:00',
                                     gpu=gpu_name))[0]
  mask = shapes.make_mask(shape, np.random.default_rng(0))
  arrays = {name: getattr(mask, name) for name in ('q_pos_BxT', 'kv_pos_BxS', 'kv_valid_BxS')
            if getattr(mask, name) is not None}
  on_device = jax.sharding.SingleDeviceSharding(device)
  q = jax.ShapeDtypeStruct((shape.b, shape.t, shape.n, shape.h), jnp.bfloat16,
                           sharding=on_device)
  kv = jax.ShapeDtypeStruct((shape.b, shape.s, shape.k, shape.h), jnp.bfloat16,
                            sharding=on_device)
  mask_args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=on_device)
               for k, v in arrays.items()}

  def fwd_bwd(q, k, v, masks):
    def run(q, k, v):
      return flash_attention.attention(q, k, v, causal=mask.causal, window=mask.window,
                                       interpret=False, **masks)
    out, vjp = jax.vjp(run, q, k, v)
    return out, vjp(out)

  with tempfile.TemporaryDirectory() as dump:
    options = dict(gpu.compiler_options(), xla_dump_to=dump)
    jax.jit(fwd_bwd).trace(q, kv, kv, mask_args).lower().compile(compiler_options=options)
    launches = _launches(dump)
    found = []
    for path in glob.glob(f'{dump}/*.ptx'):
      if 'flash_attention' in pathlib.Path(path).read_text():
        for name, r in _ptxas_report(path).items():
          threads, shared = launches[name]
          found.append(Resources(name, threads=threads, shared=shared, **r))
  return sorted(found, key=lambda r: r.kernel)


def main(argv):
  del argv
  print(f'# Pallas flash attention (Triton lowering) for sm_90a, {FLAGS.gpu}, jax '
        f'{jax.__version__}, ptxas of the CUDA wheels; tiles {flash_attention.Blocks()}')
  print('| shape | B x T x S, N/K x H, mask | kernel | registers | spill stores / loads B | '
        'stack B | threads | shared KiB | blocks/SM |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in FLAGS.shapes:
    shape = shapes.SHAPES[name]
    for r in resources(shape, FLAGS.gpu):
      print(f'| {name} | {shape.b} x {shape.t} x {shape.s}, {shape.n}/{shape.k} x {shape.h}, '
            f'{shape.mask} | {r.kernel} | {r.registers} | {r.spill_stores} / {r.spill_loads} | '
            f'{r.stack} | {r.threads} | {r.shared / 1024:.0f} | {r.blocks_per_sm} |', flush=True)


if __name__ == '__main__':
  app.run(main)
