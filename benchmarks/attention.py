# python benchmarks/attention.py [--shapes=cwm_8k,enigma_local,...] [--backends=pallas,cudnn,xla]
"""Attention backends at the models' shapes: forward and forward+backward.

For each shape and backend: median time of the forward and of forward+backward
(jitted, after warm-up, inputs on the device), their TFLOP/s over the visible
query-key pairs (causal counts half; backward = 2.5 x forward), and the
memory XLA plans for the compiled forward+backward beyond its inputs and
outputs (`temp`, from compiled.memory_analysis()), and the relative error of the
output and gradients against XLA attention in fp32 on the same inputs. The ratios come last:
pallas time over cudnn time, xla temp memory over pallas temp memory.

On a GPU the default shapes are CWM's (1 x 8192 and 10240 tokens x 64 heads x
128, causal) and Enigma 1B's per-GPU shapes (8 windows; 24 heads x 64).
Elsewhere the default shapes are small, a check that every backend runs
(cudnn needs a GPU and is skipped; pallas runs interpreted); `--memory_only`
compiles any shape without running it, for XLA's memory plan on this host.
"""



import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.shapes import GPU_SHAPES, SHAPES, Shape, make_mask, visible_pairs
from benchmarks.timing import median_seconds
from brainscale import nn

flags.DEFINE_list('shapes', None, 'shapes to run (default: all GPU shapes on GPU, smoke '
                  'elsewhere)')
flags.DEFINE_list('backends', ['pallas', 'cudnn', 'xla'], 'backends to compare')
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'q, k, v dtype')
flags.DEFINE_integer('repeats', 10, 'timed calls per measurement (median)')
flags.DEFINE_bool('memory_only', False, 'compile and report memory, time nothing (e.g. the '
                  'GPU shapes on a CPU)')
FLAGS = flags.FLAGS


def measure(shape: Shape, backend: str, dtype) -> dict:
  rng = np.random.default_rng(0)
  mask = make_mask(shape, rng)
  q = jnp.asarray(rng.standard_normal((shape.b, shape.t, shape.n, shape.h)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((shape.b, shape.s, shape.k, shape.h)), dtype)
          for _ in range(2))

  def forward(q, k, v, mask):
    return nn.attend(q, k, v, mask, backend)

  def loss(q, k, v, mask):
    return forward(q, k, v, mask).astype(jnp.float32).sum()

  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  temp = fwd_bwd.lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes
  if FLAGS.memory_only:
    t_fwd = t_fwd_bwd = float('nan')
  else:
    t_fwd, t_fwd_bwd = (median_seconds(fwd, q, k, v, mask, repeats=FLAGS.repeats),
                        median_seconds(fwd_bwd, q, k, v, mask, repeats=FLAGS.repeats))
  flops = 4.0 * shape.n * shape.h * visible_pairs(shape, mask)
  err = float('nan') if FLAGS.memory_only else error(shape, fwd, fwd_bwd, q, k, v, mask)
  return dict(fwd_ms=1e3 * t_fwd, fwd_bwd_ms=1e3 * t_fwd_bwd, fwd_tflops=flops / t_fwd / 1e12,
              fwd_bwd_tflops=3.5 * flops / t_fwd_bwd / 1e12, temp_gib=temp / 2**30, error=err)


def error(shape: Shape, fwd, fwd_bwd, q, k, v, mask) -> float:
  """Largest ||x - ref|| / ||ref|| of the output (and of dq, dk, dv where the fp32 XLA
  gradient fits: T x S <= 2^24) against XLA attention in fp32 on the same inputs."""
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  reference = jax.jit(lambda q, k, v, mask: nn.attend(q, k, v, mask, 'xla'))
  pairs = [(fwd(q, k, v, mask), reference(*f32(q, k, v), mask))]
  if shape.t * shape.s <= 2 ** 24:
    ref_grad = jax.jit(jax.grad(lambda q, k, v, mask: reference(q, k, v, mask).sum(),
                                argnums=(0, 1, 2)))
    pairs += zip(fwd_bwd(q, k, v, mask), ref_grad(*f32(q, k, v), mask))
  rel = lambda x, ref: float(jnp.linalg.norm(x.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  return max(rel(x, ref) for x, ref in pairs)


def main(argv):
  del argv
  on_gpu = jax.default_backend() == 'gpu'
  names = FLAGS.shapes or (GPU_SHAPES if on_gpu else ['smoke', 'smoke_local'])
  backends = [b for b in FLAGS.backends if on_gpu or b != 'cudnn']
  dtype = jnp.dtype(FLAGS.dtype)
  print(f'# {jax.devices()[0].device_kind} | jax {jax.__version__} | {FLAGS.dtype} | '
        f'median of {FLAGS.repeats}' + ('' if on_gpu else ' | cudnn skipped (no GPU)'))
  print('| shape | B x T x S, N/K x H, mask | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | '
        'fwd+bwd TFLOP/s | temp GiB | rel. error vs fp32 xla |')
  print('|---|---|---|---|---|---|---|---|---|')
  results = {}
  for name in names:
    shape = SHAPES[name]
    for backend in backends:
      try:
        r = measure(shape, backend, dtype)
      except Exception as e:  # an OOM or an unsupported mask is a row, not the end of the run
        print(f'| {name} | | {backend} | failed: {type(e).__name__}: {str(e)[:120]} |')
        continue
      results[name, backend] = r
      print(f'| {name} | {shape.b} x {shape.t} x {shape.s}, {shape.n}/{shape.k} x {shape.h}, '
            f'{shape.mask} | {backend} | {r["fwd_ms"]:.3f} | {r["fwd_tflops"]:.3g} | '
            f'{r["fwd_bwd_ms"]:.3f} | {r["fwd_bwd_tflops"]:.3g} | {r["temp_gib"]:.3f} | '
            f'{r["error"]:.2g} |',
            flush=True)
  print('\nratios (same run):')
  for name in names:
    pallas = results.get((name, 'pallas'))
    if pallas is None:
      continue
    line = [name]
    if (name, 'cudnn') in results:
      cudnn = results[name, 'cudnn']
      line.append(f'pallas/cudnn time fwd {pallas["fwd_ms"] / cudnn["fwd_ms"]:.2f}, '
                  f'fwd+bwd {pallas["fwd_bwd_ms"] / cudnn["fwd_bwd_ms"]:.2f}')
    if (name, 'xla') in results:
      xla = results[name, 'xla']
      line.append(f'xla/pallas temp memory {xla["temp_gib"] / max(pallas["temp_gib"], 1e-9):.1f}x'
                  f', xla/pallas fwd+bwd time {xla["fwd_bwd_ms"] / pallas["fwd_bwd_ms"]:.2f}')
    print('  ' + ' | '.join(line))


if __name__ == '__main__':
  app.run(main)
