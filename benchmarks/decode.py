# python benchmarks/decode.py [--experiment=cwm_tiny] [--batch=8] [--repeats=3]
#                             [--cache_of=cwm_tiny,cwm_1b,cwm_80b] [--gpu_of=cwm_1b_1gpu]
"""CWM decoding: KV-cached against recomputed, and what a decoded token costs on an H100.

1. Sequential prediction of a whole frame 1 from frame 0 (every frame-1 patch
   hidden, decoded one after another, each seeing the ones before it) on
   `--experiment`'s model (randomly initialised: speed does not depend on the
   weights), cached and recomputed, in one run: wall time per frame, decoded
   tokens per second, and their ratio. Parallel decoding the same way.
2. The KV cache of a whole two-frame sequence per example, for each of
   `--cache_of`: every layer's keys and values in the compute dtype, and per
   device where the experiment's mesh splits heads over `tensor`.
3. With JAX's CUDA plugin installed (requirements-cuda.txt), `--gpu_of` compiled
   for its GPUs by XLA's GPU compiler without a GPU: one sequential decode step
   (one token against a full cache) -- XLA's memory plan, and the roofline time
   of its kernels (brainscale/plan/hlo.py), against the bound of reading every weight
   and the cache once at HBM bandwidth.
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from benchmarks.timing import median_seconds
from brainscale import config as config_lib
from brainscale import parallel
from brainscale.cwm import counterfactual
from brainscale.plan import collectives, hlo
from brainscale.plan import gpu as gpu_lib
from brainscale.train import step as step_lib
from brainscale.train.task import get_task

FLAGS = flags.FLAGS
flags.DEFINE_string('experiment', 'cwm_tiny', 'the model timed on this host')
flags.DEFINE_integer('batch', 8, 'clips predicted at once')
flags.DEFINE_integer('repeats', 3, 'timed predictions (median)')
flags.DEFINE_list('cache_of', ['cwm_tiny', 'cwm_1b', 'cwm_80b'], 'experiments whose cache '
                  'memory is reported')
flags.DEFINE_string('gpu_of', 'cwm_1b_1gpu', 'experiment whose decode step is compiled for '
                    'its GPUs (empty: none)')
GiB = 2 ** 30


def timed(config, batch: int, repeats: int) -> list[dict]:
  """Whole-frame prediction, sequential and parallel, cached and recomputed."""
  setup = step_lib.build(config)
  model = nnx.merge(setup.graphdef, step_lib.init_state(setup)['params'])
  layout = model.layout
  frames = jax.random.randint(jax.random.key(0), (batch, 2, layout.height, layout.width, 3), 0,
                              256).astype(jnp.uint8)
  revealed_BxR = jnp.zeros((batch, 0), jnp.int32)
  rows = []
  for sequential in (True, False):
    for cached in (True, False):
      predict = nnx.jit(lambda m, f, r, s=sequential, c=cached: counterfactual.predict_frame(
          m, f, r, sequential=s, cached=c, decode='argmax')['image'])
      start = time.perf_counter()
      jax.block_until_ready(predict(model, frames, revealed_BxR))
      compile_s = time.perf_counter() - start
      seconds = median_seconds(predict, model, frames, revealed_BxR, repeats=repeats, warmup=0)
      rows.append(dict(mode='sequential' if sequential else 'parallel',
                       path='cached' if cached else 'recompute', seconds=seconds,
                       first_call_s=compile_s,
                       tokens_per_s=batch * 4 * layout.patches / seconds))
  return rows


def cache_size(config) -> dict:
  """The cache of one whole sequence per example (compute dtype), and per device."""
  task = get_task(config)
  model = nnx.eval_shape(lambda: task.model(nnx.Rngs(0)))
  dtype = jax.numpy.dtype(config.model.compute_dtype)
  cache = jax.eval_shape(lambda: model.init_cache(1, task.layout.length, dtype))
  per_example = 2 * cache.k_LxBxSxKxH.size * dtype.itemsize
  nodes = config.cluster.nodes if 'cluster' in config else 1
  _, ici = config_lib.mesh_shape(config.mesh, config_devices(config), nodes)
  tensor = ici['tensor']
  heads = cache.k_LxBxSxKxH.shape[3]
  split = tensor if heads % tensor == 0 else 1
  return dict(experiment=config.experiment, layers=cache.k_LxBxSxKxH.shape[0],
              slots=task.layout.length, kv_heads=heads, head_dim=cache.k_LxBxSxKxH.shape[4],
              dtype=str(dtype), per_example_gib=per_example / GiB, tensor=split,
              per_device_gib=per_example / split / GiB)


def config_devices(config) -> int:
  return config_lib.cluster_devices(config.cluster) if 'cluster' in config else 1


def gpu_step(config, batch: int) -> dict:
  """One sequential decode step of `batch` tokens against full caches, compiled for the
  experiment's GPUs (no GPU needed): memory plan and roofline time."""
  devices = gpu_lib.topology(config.cluster)
  mesh = parallel.make_mesh(config.mesh, devices, nodes=config.cluster.nodes)
  setup = step_lib.build(config, mesh)
  dtype = jnp.dtype(config.model.compute_dtype)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding),
                        setup.abstract_state['params'])
  slots = setup.task.layout.length

  def step(params, cache, tokens_Bx1, pos_Bx1x3):
    with parallel.axis_rules(setup.mesh, setup.rules):
      model = nnx.merge(setup.graphdef, params)
      x_Bx1xD, cache = model.decode(tokens_Bx1, pos_Bx1x3, cache)
      return model.content_logits(x_Bx1xD), cache

  def empty_cache():
    with parallel.axis_rules(setup.mesh, setup.rules):
      return nnx.merge(setup.graphdef, params).init_cache(batch, slots, dtype)

  shardings = jax.jit(empty_cache).lower().compile().output_shardings
  cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       jax.eval_shape(empty_cache), shardings)
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  pos = jax.ShapeDtypeStruct((batch, 1, 3), jnp.float32)
  compiled = jax.jit(step, donate_argnums=1).trace(params, cache, tokens, pos).lower().compile(
      compiler_options=gpu_lib.compiler_options())
  memory = compiled.memory_analysis()
  gpu = gpu_lib.spec(config.cluster.gpu)
  analysis = hlo.analyze(compiled.as_text(), collectives.Layout.of_mesh(mesh))
  weights = sum(a.size for a in jax.tree.leaves(params)) * dtype.itemsize / len(devices)
  cache_bytes = 2 * cache.k_LxBxSxKxH.size * dtype.itemsize / len(devices)
  return dict(experiment=config.experiment, devices=f'{len(devices)} x {devices[0].device_kind}',
              batch=batch, slots=slots, argument_gib=memory.argument_size_in_bytes / GiB,
              temp_gib=memory.temp_size_in_bytes / GiB, alias_gib=memory.alias_size_in_bytes / GiB,
              weights_gib=weights / GiB, cache_gib=cache_bytes / GiB,
              roofline_ms=analysis.compute_seconds(gpu) * 1e3,
              bandwidth_bound_ms=(weights + cache_bytes) / gpu.hbm_bandwidth * 1e3,
              gpu=gpu.name)


def report(rows: list[dict], caches: list[dict], steps: list[dict]) -> str:
  lines = ['mode        path       s/frame  first call s  decoded tokens/s']
  for r in rows:
    lines.append(f"{r['mode']:<11} {r['path']:<10} {r['seconds']:7.3f}  {r['first_call_s']:12.1f}"
                 f"  {r['tokens_per_s']:16.1f}")
  by = {(r['mode'], r['path']): r['seconds'] for r in rows}
  for mode in ('sequential', 'parallel'):
    lines.append(f'{mode}: cached is {by[mode, "recompute"] / by[mode, "cached"]:.1f}x faster')
  lines.append('')
  lines.append('cache of one whole sequence: experiment, layers x slots x kv heads x head dim, '
               'dtype, GiB per example; per device under its mesh, and with heads over 8 GPUs')
  for c in caches:
    lines.append(f"  {c['experiment']:<10} {c['layers']} x {c['slots']} x {c['kv_heads']} x "
                 f"{c['head_dim']}  {c['dtype']}  {c['per_example_gib']:.3f}  "
                 f"{c['per_device_gib']:.3f} (heads over tensor={c['tensor']}); "
                 f"{c['per_example_gib'] / 8:.3f} over 8")
  for s in steps:
    lines.append('')
    lines.append(f"decode step of {s['experiment']} on {s['devices']} (batch {s['batch']}, "
                 f"cache {s['slots']} slots), per device: arguments {s['argument_gib']:.2f} GiB "
                 f"(weights {s['weights_gib']:.2f}, cache {s['cache_gib']:.2f}), temp "
                 f"{s['temp_gib']:.3f} GiB, aliased {s['alias_gib']:.2f} GiB")
    lines.append(f"  roofline of its kernels {s['roofline_ms']:.2f} ms per step ({s['batch']} "
                 f"tokens); reading weights + cache once at {s['gpu']} HBM "
                 f"bandwidth {s['bandwidth_bound_ms']:.2f} ms")
  return '\n'.join(lines)


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')   # the GPU step compiles here; nothing runs
  config = config_lib.resolve(FLAGS.experiment, [])
  rows = timed(config, FLAGS.batch, FLAGS.repeats)
  caches = [cache_size(config_lib.resolve(name, [])) for name in FLAGS.cache_of]
  steps = []
  if FLAGS.gpu_of and gpu_lib.compiler_available():
    gpu_config = config_lib.resolve(FLAGS.gpu_of, [])
    steps = [gpu_step(gpu_config, b) for b in (1, 8)]
  elif FLAGS.gpu_of:
    print('(no CUDA plugin: pip install -r requirements-cuda.txt for the GPU decode step)')
  print(f'jax {jax.__version__}; {FLAGS.experiment} on {jax.devices()[0].device_kind}, '
        f'batch {FLAGS.batch}, median of {FLAGS.repeats}')
  print(report(rows, caches, steps))


if __name__ == '__main__':
  app.run(main)
