# XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
#   python benchmarks/restore_bytes.py [--dim=1024] [--layers=6] [--workdir=DIR]
"""Bytes read by a params-only load: the target layout directly vs the stored layout then reshard.

Saves step 0 of a freshly initialised cwm_tiny train state (scaled up by --dim/--layers)
the way training does (Checkpoints.save, trained on data 2 x fsdp 4, loaded on the
`inference` mesh of tensor 4 x data 2), then, each in a fresh subprocess, restores the params:
  target:  Orbax's partial restore straight into the inference mesh's tensor layout (what
           inspect.load did before it read whole stored chunks);
  stored:  the same restore in the training mesh's shardings (the stored chunks), then
           jax.device_put to the inference shardings;
  inspect: Checkpoints.restore_params, as inspect.load calls it: whole stored chunks per
           device (checkpoint.chunk_aligned), then laid out on device array by array;
  one:     inspect.load in float32 on one device (each array read once, whole).
First with Orbax's restore_concurrent_gb at its 96 GB default (the real code paths), then
with it scaled to this model as 96 GB is to cwm_80b's largest array (its scanned MLP matrix):
Orbax reserves a shard's chunk-aligned bytes before reading it, so whether the shards that
need the same chunks are read at once (and share them) depends on that ratio.
Bytes are the process's /proc/self/io counters around the restore: rchar (read()/pread()
syscalls, page-cache hits included) and read_bytes (from the disk). The page cache is warm
(the files were just written; nothing is dropped).
"""


import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import app, flags

from brainscale import config as config_lib
from brainscale import inspect, parallel
from brainscale.train import step as step_lib
from brainscale.train.checkpoint import Checkpoints, one_line
from brainscale.train.task import get_task

flags.DEFINE_integer('dim', 1024, 'model.dim of the scaled-up cwm_tiny (head_dim 128)')
flags.DEFINE_integer('layers', 6, 'model.layers')
flags.DEFINE_string('workdir', '', 'where the checkpoint is written (default: a temporary '
                    'folder, removed after)')
flags.DEFINE_string('strategy', '', 'internal: measure this one strategy in this process')
flags.DEFINE_string('dtype', 'float32', 'internal: the params dtype of --strategy')
flags.DEFINE_float('limit_gb', 0.0, "internal: Orbax's restore_concurrent_gb (0: its default)")
FLAGS = flags.FLAGS

TRAINING_MESH = ['--config.mesh.ici.data=2', '--config.mesh.ici.fsdp=4']
RUNS = [('target', 'float32'), ('stored', 'float32'), ('inspect', 'float32'), ('one', 'float32'),
        ('target', 'bfloat16'), ('stored', 'bfloat16'), ('inspect', 'bfloat16')]
SCALED_RUNS = [('target', 'float32'), ('stored', 'float32'), ('inspect', 'float32'),
               ('target', 'bfloat16'), ('stored', 'bfloat16'), ('inspect', 'bfloat16')]
DEFAULT_GB = 96   # Orbax's restore_concurrent_gb, which Checkpoints.restore_params keeps
WHAT = {'target': 'tensor 4 x data 2 layout directly (the old inspect.load)',
        'stored': 'stored layout (data 2 x fsdp 4), then device_put',
        'inspect': 'inspect.load: whole stored chunks, then laid out on device',
        'one': 'inspect.load: one device'}
MB = 1e6


def overrides(dim: int, layers: int) -> list[str]:
  heads = dim // 128
  return [f'--config.model.dim={dim}', f'--config.model.layers={layers}',
          f'--config.model.heads={heads}', '--config.model.head_dim=128',
          f'--config.model.mlp_hidden={4 * dim}', '--config.tokenizer.model.channels=16',
          '--config.tokenizer.experiment=', '--config.inference.tensor=4'] + TRAINING_MESH


def save(workdir: pathlib.Path, config) -> int:
  """Step 0 of the initialised train state, saved on its training mesh; the params' bytes."""
  setup = step_lib.build(config)
  state = step_lib.init_state(setup)
  checkpoints = Checkpoints(str(workdir), keep=1, async_save=False)
  checkpoints.save(0, state, None, config)
  checkpoints.close()
  return sum(x.nbytes for x in jax.tree.leaves(state['params']))


def stored_bytes(state_dir: pathlib.Path) -> tuple[int, int, str]:
  """(bytes of every file under state/, bytes of the params' chunks in its OCDBT database,
  w_q's shape and chunk shape)."""
  files = sum(p.stat().st_size for p in state_dir.rglob('*') if p.is_file())
  kvstore = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{state_dir}/'}).result()
  params = sum(len(kvstore.read(key).result().value) for key in kvstore.list().result()
               if key.startswith(b'params.'))
  zarray = json.loads(kvstore.read(b'params.blocks.layers.attn.w_q_DxNxH/.zarray').result().value)
  return files, params, f'w_q {tuple(zarray["shape"])} in chunks {tuple(zarray["chunks"])}'


def layouts(workdir: pathlib.Path, dtype) -> tuple[dict, dict]:
  """(stored, target): the params' ShapeDtypeStructs in `dtype`, sharded as the training mesh
  saved them (data 2 x fsdp 4: whole stored chunks per device) and as inspect.load lays them
  out (the config's inference mesh)."""
  checkpoints = Checkpoints(str(workdir), keep=1_000_000, async_save=False)
  config = inspect.saved_config(checkpoints.config(checkpoints.latest()))
  checkpoints.close()
  trained = step_lib.build(config).abstract_state['params']
  floating = lambda a: dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
  stored = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, floating(a), sharding=a.sharding),
                        trained)
  mesh = parallel.inference_mesh(inspect.inference(config).tensor)
  return stored, inspect.abstract_params(get_task(config), mesh, dtype)[1]


def restore(workdir: pathlib.Path, target: dict, limit_gb: float) -> dict:
  """Orbax's partial restore of the params straight into `target`'s shardings, with its
  restore_concurrent_gb at `limit_gb` (0: its 96 GB default)."""
  checkpoints = Checkpoints(str(workdir), keep=1_000_000, async_save=False)
  step = checkpoints.latest()
  checkpoints.close()
  item = {'params': target}
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item))
  handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit_gb or DEFAULT_GB)
  with ocp.Checkpointer(handler) as checkpointer:
    return checkpointer.restore(checkpoints.directory / str(step) / 'state', args=args)['params']


def load(strategy: str, workdir: pathlib.Path, dtype, limit_gb: float) -> dict:
  if strategy == 'one':
    return inspect.load(workdir, dtype=dtype,
                        mesh=parallel.inference_mesh(1, jax.devices()[:1])).params
  stored, target = layouts(workdir, dtype)
  if strategy == 'inspect':
    checkpoints = Checkpoints(str(workdir), keep=1_000_000, async_save=False)
    try:
      return checkpoints.restore_params(checkpoints.latest(), target,
                                        concurrent_gb=limit_gb or None)
    finally:
      checkpoints.close()
  if strategy == 'target':
    return restore(workdir, target, limit_gb)
  if strategy == 'stored':
    params = restore(workdir, stored, limit_gb)
    return jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
  raise ValueError(f'--strategy={strategy!r}; expected one of {sorted(WHAT)}')


def io_counters() -> dict[str, int]:
  lines = pathlib.Path('/proc/self/io').read_text().splitlines()
  return {k: int(v) for k, v in (line.split(': ') for line in lines)}


def peak_rss() -> int:
  """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) * 1024
  return 0


def measure(strategy: str, workdir: pathlib.Path, dtype, limit_gb: float) -> dict:
  """One strategy in this (fresh) process: bytes read, seconds, and the layout it ends in."""
  jax.block_until_ready(jax.device_put(jnp.zeros(8), jax.devices()[0]))   # backend up
  before, start = io_counters(), time.perf_counter()
  try:
    params = jax.block_until_ready(load(strategy, workdir, dtype, limit_gb))
  except ValueError as e:   # Orbax: one shard's chunk-aligned read exceeds the limit
    return dict(error=one_line(e, 120))
  seconds, after = time.perf_counter() - start, io_counters()
  w_q = params['blocks']['layers']['attn']['w_q_DxNxH']
  return dict(rchar=after['rchar'] - before['rchar'],
              read_bytes=after['read_bytes'] - before['read_bytes'],
              syscr=after['syscr'] - before['syscr'], seconds=seconds, peak_rss=peak_rss(),
              spec=str(w_q.sharding.spec), shard=str(w_q.addressable_shards[0].data.shape))


def run_fresh(strategy: str, dtype: str, limit_gb: float, workdir: pathlib.Path) -> dict:
  done = subprocess.run([sys.executable, __file__, f'--strategy={strategy}', f'--dtype={dtype}',
                         f'--limit_gb={limit_gb}', f'--workdir={workdir}'],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f'--strategy={strategy} --dtype={dtype} failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def largest_bytes(config) -> int:
  """Bytes of the largest f32 param: a scanned MLP matrix, layers x dim x mlp_hidden."""
  return 4 * config.model.layers * config.model.dim * config.model.mlp_hidden


def main(argv):
  del argv
  if jax.device_count() != 8:
    raise SystemExit(f'brainscale: {jax.device_count()} devices here; run with XLA_FLAGS='
                     '--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu')
  if FLAGS.strategy:
    print(json.dumps(measure(FLAGS.strategy, pathlib.Path(FLAGS.workdir),
                             inspect.params_dtype(FLAGS.dtype), FLAGS.limit_gb)))
    return
  config = config_lib.resolve('cwm_tiny', overrides(FLAGS.dim, FLAGS.layers))
  big = config_lib.resolve('cwm_80b', [])
  scaled_gb = DEFAULT_GB * largest_bytes(config) / largest_bytes(big)
  workdir = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix='restore_bytes_'))
  try:
    start = time.perf_counter()
    in_memory = save(workdir, config)
    files, params, chunks = stored_bytes(workdir / 'checkpoints' / '0' / 'state')
    print(f'cwm_tiny {" ".join(overrides(FLAGS.dim, FLAGS.layers))}: params {in_memory / MB:.0f}'
          f' MB f32 in memory; state/ {files / MB:.0f} MB of files, the params\' chunks '
          f'{params / MB:.0f} MB of them (zstd), {chunks}; saved in '
          f'{time.perf_counter() - start:.0f} s. Scaled limit: {DEFAULT_GB} GB x largest array '
          f'here / in cwm_80b ({largest_bytes(config) / MB:.0f} MB / '
          f'{largest_bytes(big) / 1e9:.1f} GB) = {scaled_gb * 1e3:.1f} MB')
    print('| strategy | dtype | restore_concurrent_gb | rchar MB | x params\' chunks '
          '| read_bytes MB | read syscalls | w_q spec (shard) | wall s | peak RSS MB |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    runs = [(s, d, 0.0) for s, d in RUNS] + [(s, d, scaled_gb) for s, d in SCALED_RUNS]
    for strategy, dtype, limit_gb in runs:
      r = run_fresh(strategy, dtype, limit_gb, workdir)
      limit = f'{limit_gb * 1e3:.1f} MB (scaled)' if limit_gb else f'{DEFAULT_GB} GB (default)'
      what = WHAT[strategy]
      if 'error' in r:
        print(f'| {what} | {dtype} | {limit} | fails: {r["error"]} |||||||',
              flush=True)
        continue
      print(f'| {what} | {dtype} | {limit} | {r["rchar"] / MB:.0f} '
            f'| {r["rchar"] / params:.2f} | {r["read_bytes"] / MB:.0f} | {r["syscr"]} '
            f'| `{r["spec"]}` {r["shard"]} | {r["seconds"]:.1f} | {r["peak_rss"] / MB:.0f} |',
            flush=True)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
