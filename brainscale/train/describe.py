"""`--mode=describe`: the parameter table, `params: N`, FLOPs and an analytic memory estimate.

Nothing is allocated: the model is built under nnx.eval_shape and the mesh is
only a set of axis sizes, so an 80B config describes on a laptop.
"""

import dataclasses
import math
import types

import jax
import numpy as np
from flax import nnx

from brainscale import config as config_lib
from brainscale import parallel
from brainscale.nn.core import axes_of
from brainscale.train import optim
from brainscale.train.task import costs, get_task

GiB = 1024 ** 3


def _human(n: float) -> str:
  for unit, size in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= size:
      return f'{n / size:.2f}{unit}'
  return f'{n:.0f}'


@dataclasses.dataclass(frozen=True)
class ParamRow:
  """One parameter as describe lists it."""
  path: str
  shape: tuple
  axes: tuple          # logical axes
  spec: object         # its PartitionSpec on the mesh
  count: int           # elements
  shards: int          # devices it is split over


def parameter_rows(config, mesh_sizes: dict) -> list[ParamRow]:
  """One ParamRow per parameter of the model (built abstractly)."""
  task = get_task(config)
  model = nnx.eval_shape(lambda: task.model(nnx.Rngs(0)))
  rules = parallel.rules_table(config.mesh.rules)
  mesh = types.SimpleNamespace(shape=mesh_sizes)
  rows = []
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = '/'.join(str(p) for p in path)
    spec = parallel.spec(axes_of(v), rules, mesh, v.shape, name)
    shards = math.prod(mesh_sizes[a] for part in spec if part
                       for a in (part if isinstance(part, tuple) else (part,)))
    rows.append(ParamRow(name, tuple(v.shape), axes_of(v), spec, math.prod(v.shape), shards))
  return rows


def describe(config, num_devices: int | None = None) -> str:
  """The describe report as text (for the experiment's cluster when it has one)."""
  num_nodes = 1
  if num_devices is None and 'cluster' in config:
    num_nodes = config.cluster.nodes
    num_devices = config_lib.cluster_devices(config.cluster)
  num_devices = num_devices or jax.device_count()
  dcn, ici = parallel.mesh_shape(config.mesh, num_devices, num_nodes)
  sizes = {a: dcn[a] * ici[a] for a in parallel.AXES}
  rows = parameter_rows(config, sizes)
  task = costs(get_task(config))
  width = max(len(r.path) for r in rows)
  lines = [config.to_json_best_effort(indent=2, sort_keys=True), '',
           f'{"parameter":<{width}}  {"shape":<22} {"logical axes":<44} {"mesh":<28} count']
  for r in rows:
    lines.append(f'{r.path:<{width}}  {str(r.shape):<22} {str(r.axes):<44} '
                 f'{str(tuple(r.spec)):<28} {_human(r.count)}')
  n = sum(r.count for r in rows)
  batch = config.train.batch_size
  flops = task.flops_per_example() * batch
  per_device = {k: v for k, v in sizes.items() if v > 1}
  param_bytes = np.dtype(config.model.param_dtype).itemsize
  compute_bytes = np.dtype(config.model.compute_dtype).itemsize
  shard_elems = sum(r.count / r.shards for r in rows)
  data_shards = math.prod(config_lib.batch_axes(config, num_devices, num_nodes).values())
  examples = max(batch // data_shards // config.train.microbatches, 1)
  memory = {
      'params': shard_elems * param_bytes,
      'optimizer (2 moments)': 2 * shard_elems * 4,
      'gradients': shard_elems * param_bytes,
      'compute-dtype params': shard_elems * compute_bytes,
      f'activations ({examples} examples/device)': task.activation_bytes(examples),
  }
  lines += ['', f'params: {n}  ({_human(n)})', *task.describe_lines(rows),
            f'flops_per_step: {flops:.4g}  (model FLOPs fwd+bwd, batch {batch})',
            f'mesh: {per_device or "1 device"} over {num_devices} devices',
            'memory per device (analytic):']
  lines += [f'  {k:<36} {v / GiB:10.3f} GiB' for k, v in memory.items()]
  lines.append(f'  {"total":<36} {sum(memory.values()) / GiB:10.3f} GiB')
  frozen = [name for name, pre in task.prerequisites().items() if pre.frozen]
  return '\n'.join(lines + group_lines(config, rows, frozen))


def group_lines(config, rows, frozen=()) -> list[str]:
  """Which parameters each optimizer group holds (optim.groups; 'default' the rest)."""
  t = config.train
  groups = optim.groups(config, frozen)
  labels = optim.group_of([r.path for r in rows], groups)
  lines = ['optimizer groups (frozen first, then the first pattern that matches):']
  for name in ['default', *groups]:
    mine = [r for r, label in zip(rows, labels) if label == name]
    g = groups[name] if name != 'default' else types.SimpleNamespace(
        lr_scale=1.0, weight_decay=t.weight_decay, pattern='(the rest)')
    what = 'frozen' if g.lr_scale == 0 else f'lr x{g.lr_scale:g}, weight_decay {g.weight_decay:g}'
    example = f', e.g. {mine[0].path}' if mine else ''
    count = _human(sum(r.count for r in mine))
    lines.append(f'  {name:<12} {g.pattern!s:<36} {what:<34} {count:>8} '
                 f'params in {len(mine)} tensors{example}')
  return lines
