"""Device mesh, logical-axis sharding rules and multi-process start-up.

The mesh has the named axes of AXES, each sized DCN (across nodes) x ICI
(within a node) from `config.mesh`. Parameters and activations carry logical
axis names (the constants below: EMBED, HEADS, BATCH, ...); `config.mesh.rules` maps
them to mesh axes, so changing the parallelism is a config change, never a model change.
`resolve` is the one mapping: strict for parameters and batches (a mesh axis that does
not divide is a ConfigError), lenient for activations and kernels (it is left out).
"""

import contextlib
import contextvars
import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from brainscale.config import AXES, ConfigError, mesh_shape  # JAX-free, so they live in config

# Logical axes (keys of config.mesh.rules); a typo is a NameError at import.
# Parameters:
EMBED = 'embed'          # the model dimension
HEADS = 'heads'          # query heads
KV_HEADS = 'kv_heads'    # key/value heads
HEAD_DIM = 'head_dim'
MLP = 'mlp'              # the MLP's hidden dimension
VOCAB = 'vocab'
LAYERS = 'layers'        # the leading axis of a scanned Stack
NORM = 'norm'            # a norm's scale
# Activations:
BATCH = 'batch'          # examples (config.batch_axes reads its rule)
LENGTH = 'length'        # the sequence, whole on each device unless split by `sequence`
ACT_LENGTH = 'act_length'  # the sequence of the residual stream (sequence parallelism)
ACT_EMBED = 'act_embed'
ACT_HEADS = 'act_heads'
ACT_MLP = 'act_mlp'
ACT_VOCAB = 'act_vocab'
# The two layouts of [B, T, D] activations: the input of attention and the MLP (whole
# along the sequence) and the residual stream between them (split along it by act_length).
WHOLE = (BATCH, LENGTH, ACT_EMBED)
RESIDUAL = (BATCH, ACT_LENGTH, ACT_EMBED)


def initialize_distributed(mesh_config) -> bool:
  """Calls jax.distributed.initialize() under SLURM or when told a coordinator.

  Returns whether this is a multi-process run. Must run before any JAX call
  touches the devices.
  """
  in_srun = 'SLURM_STEP_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if mesh_config.coordinator:
    jax.distributed.initialize(
        coordinator_address=mesh_config.coordinator,
        num_processes=mesh_config.num_processes,
        process_id=mesh_config.process_id,
        initialization_timeout=mesh_config.init_timeout_s,
        heartbeat_timeout_seconds=mesh_config.get('heartbeat_timeout_s', 100))
    return True
  if in_srun:
    jax.distributed.initialize(
        initialization_timeout=mesh_config.init_timeout_s,
        heartbeat_timeout_seconds=mesh_config.get('heartbeat_timeout_s', 100))
    return True
  return False


def num_nodes() -> int:
  """Nodes of this job: SLURM's count in a multi-process run, else 1."""
  if jax.process_count() == 1:
    return 1
  return int(os.environ.get('SLURM_JOB_NUM_NODES', os.environ.get('SLURM_NNODES', 1)))


def make_mesh(mesh_config, devices=None, nodes: int | None = None) -> Mesh:
  """Builds the global mesh; ICI axes vary fastest within a node.

  `nodes` overrides the node count (plan mode lays simulated devices out as the cluster's).
  """
  devices = list(devices if devices is not None else jax.devices())
  if nodes is None:
    nodes = num_nodes() if devices == jax.devices() else 1
  dcn, ici = mesh_shape(mesh_config, len(devices), nodes)
  shape = tuple(dcn[a] * ici[a] for a in AXES)
  if nodes == 1:
    try:
      array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      array = np.asarray(devices).reshape(shape)
  else:
    # Processes of one node are contiguous in SLURM's rank order.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(ordered).reshape(tuple(dcn.values()) + tuple(ici.values()))
    n = len(AXES)
    grid = grid.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
    array = grid.reshape(shape)
  return Mesh(array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def rules_table(rules_config) -> dict[str, tuple[str, ...]]:
  """`{'batch': 'data,fsdp'}` -> `{'batch': ('data', 'fsdp')}`."""
  table = {}
  for name, axes in rules_config.items():
    table[name] = tuple(a.strip() for a in str(axes).split(',') if a.strip())
    for a in table[name]:
      if a not in AXES:
        raise ConfigError(f'mesh.rules.{name}={axes!r} names mesh axis {a!r}; axes are {AXES}')
  return table


def resolve(logical: tuple, rules: dict, mesh: Mesh | None = None, sizes=None, *,
            strict: bool = True, name: str = '') -> PartitionSpec:
  """The PartitionSpec of logical axes: the one mapping from logical to mesh axes.

  Each entry of `logical` is None, a name, or a tuple of names (a flattened
  dimension, e.g. (BATCH, ACT_LENGTH) for tokens of [B * T, D]); it takes the mesh
  axes its rules list, in order, each mesh axis once per spec, axes of size 1 left
  out. `sizes[i]` (an int, or a list when one name splits several arrays alike) is
  what entry i must divide into: a mesh axis that does not divide raises a
  ConfigError if `strict` (parameters: the config promised it), or is left out
  (activations: 4 key/value heads over a tensor axis of 8 stay whole).
  """
  used, out = set(), []
  for i, entry in enumerate(logical):
    if entry is None:
      out.append(None)
      continue
    parts = entry if isinstance(entry, tuple) else (entry,)
    for part in parts:
      if part not in rules:
        raise ConfigError(f'logical axis {part!r}{" of " + name if name else ""} has no '
                          f'entry in mesh.rules; known: {", ".join(sorted(rules))}')
    candidates = [a for part in parts for a in rules[part]]
    candidates = [a for j, a in enumerate(candidates) if a not in candidates[:j] and a not in used
                  and (mesh is None or mesh.shape[a] > 1)]
    dims = () if sizes is None or mesh is None else (
        sizes[i] if isinstance(sizes[i], (list, tuple)) else (sizes[i],))
    if strict:
      axes = candidates
      ways = math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1
      for size in dims:
        if size % ways:
          raise ConfigError(f'{name or "array"} dim {i} ({entry}={size}) does not divide '
                            f'over mesh axes {tuple(axes)} of size {ways}')
    else:
      axes, ways = [], 1
      for a in candidates:
        if all(size % (ways * mesh.shape[a]) == 0 for size in dims):
          axes.append(a)
          ways *= mesh.shape[a]
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (tuple(axes) or None))
  return PartitionSpec(*out)


def spec(logical: tuple, rules: dict, mesh: Mesh | None = None, shape=None,
         name: str = '') -> PartitionSpec:
  """The PartitionSpec of a parameter (or batch entry) of `shape`: `resolve`, strict."""
  return resolve(logical, rules, mesh, shape, strict=True, name=name)


def shardings(axes_tree, shapes_tree, mesh: Mesh, rules: dict):
  """NamedShardings for a tree of logical-axis tuples and a matching tree of shapes."""
  def one(path, axes, shaped):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    return NamedSharding(mesh, spec(axes, rules, mesh, shaped.shape, name))
  return jax.tree_util.tree_map_with_path(
      one, axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple))


_CONTEXT: contextvars.ContextVar = contextvars.ContextVar('brainscale_axis_rules', default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: dict):
  """Within this context, `constrain` shards activations by the rules."""
  token = _CONTEXT.set((mesh, rules))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def platform() -> str:
  """The platform code is being built for: that of the active mesh's devices ('gpu' when
  compiling for GPUs from a CPU host, as --mode=plan does), else JAX's default backend."""
  context = _CONTEXT.get()
  if context is None:
    return jax.default_backend()
  return context[0].devices.flat[0].platform


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
  """Sharding constraint on an activation by logical axes; a no-op outside a mesh.

  `resolve`, lenient: an entry may be a tuple of names for a flattened dimension
  ((BATCH, ACT_LENGTH) for tokens of [B * T, D]); a mesh axis that does not divide
  its dimension is left out (e.g. 4 key/value heads over a tensor axis of 8 stay whole).
  """
  context = _CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, resolve(logical, rules, mesh, x.shape, strict=False)))


def ways(logical: str, size: int) -> int:
  """How many shards the active axis rules split a dimension `logical` of `size` into, as
  `constrain` would (1 outside a mesh)."""
  context = _CONTEXT.get()
  if context is None:
    return 1
  mesh, rules = context
  axes = resolve((logical,), rules, mesh, (size,), strict=False)[0]
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def shard_local(fn, in_logical, out_logical, args):
  """`fn` run on each device's shards (jax.shard_map) under the active axis rules.

  For code XLA cannot partition (a Pallas kernel). `in_logical` mirrors `args`
  with a logical-axis tuple per array. A mesh axis that does not divide every
  dimension carrying a logical name is left out for that name (`resolve`, lenient,
  with the sizes of all of them), so that name is split alike in every array (or not
  at all). Outside a mesh, returns `fn`.
  """
  context = _CONTEXT.get()
  if context is None:
    return fn
  mesh, rules = context
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  dims = {}
  for logical, x in zip(jax.tree.leaves(in_logical, is_leaf=is_axes), jax.tree.leaves(args)):
    for name, size in zip(logical, x.shape):
      if name is not None:
        dims.setdefault(name, []).append(size)
  to_spec = lambda logical: resolve(logical, rules, mesh, [dims.get(n, []) for n in logical],
                                    strict=False)
  return jax.shard_map(fn, mesh=mesh, check_vma=False,
                       in_specs=jax.tree.map(to_spec, in_logical, is_leaf=is_axes),
                       out_specs=jax.tree.map(to_spec, out_logical, is_leaf=is_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------- inference layout

TENSOR_PARALLEL = (HEADS, KV_HEADS, MLP, VOCAB, ACT_HEADS, ACT_MLP, ACT_VOCAB)


def inference_rules(rules_config) -> dict[str, tuple[str, ...]]:
  """The logical-axis rules for decoding, from the training rules `rules_config`.

  Weights split over `tensor` along heads, kv_heads, mlp and vocab (Megatron-style: each
  layer is two all-reduces, never a gather of weights); examples over `data`; every other
  name (embed, neurons, ...) is replicated, so no weight is gathered to be used.
  """
  table = {name: () for name in rules_table(rules_config)}
  table.update({name: ('tensor',) for name in TENSOR_PARALLEL})
  table[BATCH] = ('data',)
  return table


def inference_mesh(tensor: int, devices=None) -> Mesh:
  """A mesh of `devices` (default: this process's) as data x tensor; tensor=-1 is all of them."""
  devices = list(devices if devices is not None else jax.local_devices())
  tensor = len(devices) if tensor == -1 else tensor
  if tensor < 1 or len(devices) % tensor:
    raise ConfigError(f'inference.tensor={tensor} does not divide the {len(devices)} devices '
                      f'here; expected a divisor of {len(devices)} (or -1: all of them)')
  shape = {'data': len(devices) // tensor, 'fsdp': 1, 'sequence': 1, 'tensor': tensor}
  array = np.asarray(devices).reshape(tuple(shape[a] for a in AXES))
  return Mesh(array, AXES, axis_types=(AxisType.Auto,) * len(AXES))
