# python benchmarks/loss.py [--shapes=cwm_80b,cwm_1b] [--time]
"""Softmax cross-entropy over CWM's vocabulary: chunked (nn.chunked_cross_entropy) vs naive.

For loss + gradients (dX, dW) of one device's tokens, the memory XLA plans
beyond inputs and outputs (compiled.memory_analysis().temp_size_in_bytes):
the naive loss holds the N x V fp32 logits and their gradient, the chunked one
N x chunk of them plus the fp32 dW it accumulates. `--time` (the default on a
GPU) also times both, median of --repeats after warm-up.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import median_seconds
from brainscale import nn

flags.DEFINE_list('shapes', ['cwm_80b', 'cwm_1b', 'smoke'], 'shapes to run')
flags.DEFINE_bool('time', None, 'time the calls too (default: on a GPU only; always for smoke)')
flags.DEFINE_integer('repeats', 10, 'timed calls per measurement (median)')
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Shape:
  tokens: int    # per device
  dim: int
  vocab: int
  chunk: int     # the experiment's model.loss_chunk


SHAPES = {
    'cwm_80b': Shape(10_240, 8192, 131_072, 16_384),   # one 2-frame sequence per device
    'cwm_1b': Shape(10_240, 1280, 67_584, 8448),
    'smoke': Shape(1024, 256, 16_384, 2048),
}


def naive(x_BxTxD, w_DxV, targets_BxT):
  logits_BxTxV = jnp.einsum('btd,dv->btv', x_BxTxD, w_DxV, preferred_element_type=jnp.float32)
  return nn.cross_entropy(logits_BxTxV, targets_BxT)


def measure(shape: Shape, name: str, loss, timed: bool) -> dict:
  shapes = (jax.ShapeDtypeStruct((1, shape.tokens, shape.dim), jnp.bfloat16),
            jax.ShapeDtypeStruct((shape.dim, shape.vocab), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, shape.tokens), jnp.int32))
  grad = jax.jit(jax.value_and_grad(lambda x, w, t: loss(x, w, t).mean(), argnums=(0, 1)))
  compiled = grad.lower(*shapes).compile()
  row = dict(name=name, temp_gib=compiled.memory_analysis().temp_size_in_bytes / 2**30,
             ms=float('nan'))
  if timed:
    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.standard_normal(shapes[0].shape), jnp.bfloat16),
            jnp.asarray(rng.standard_normal(shapes[1].shape) / shape.dim**0.5, jnp.bfloat16),
            jnp.asarray(rng.integers(0, shape.vocab, shapes[2].shape), jnp.int32))
    row['ms'] = 1e3 * median_seconds(compiled, *args, repeats=FLAGS.repeats)
  return row


def main(argv):
  del argv
  on_gpu = jax.default_backend() == 'gpu'
  print(f'# {jax.devices()[0].device_kind} | jax {jax.__version__} | bf16 x and w, fp32 logits')
  print('| shape | N x D x V, chunk | loss | temp GiB | loss+grad ms |')
  print('|---|---|---|---|---|')
  ratios = []
  for key in FLAGS.shapes:
    shape = SHAPES[key]
    timed = FLAGS.time if FLAGS.time is not None else (on_gpu or key == 'smoke')
    rows = [measure(shape, 'naive', naive, timed),
            measure(shape, 'chunked', functools.partial(nn.chunked_cross_entropy,
                                                        chunk=shape.chunk), timed)]
    for r in rows:
      print(f'| {key} | {shape.tokens} x {shape.dim} x {shape.vocab}, {shape.chunk} | '
            f'{r["name"]} | {r["temp_gib"]:.3f} | {r["ms"]:.1f} |', flush=True)
    over = {k: rows[0][k] / rows[1][k] for k in ('temp_gib', 'ms')}   # naive / chunked
    ratios.append(f'{key}: naive/chunked temp memory {over["temp_gib"]:.1f}x, '
                  f'time {over["ms"]:.2f}')
  print('\nratios (same run):\n  ' + '\n  '.join(ratios))


if __name__ == '__main__':
  app.run(main)
