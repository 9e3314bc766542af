"""The seam between the trainer and a model family.

A family lives in brainscale/<name>/ and exposes `task.Task`, found from
`config.task` (big_vision style). The trainer calls only what is below, so a
third brain model is a new folder and an experiment file, nothing else.
"""

import abc
import importlib

import grain
import jax
import numpy as np
from flax import nnx

from brainscale.config import ConfigError


class Task(abc.ABC):
  """What the trainer needs from a model family."""

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def model(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model (called under nnx.eval_shape for describe/plan)."""

  @abc.abstractmethod
  def train_data(self, process_index: int, process_count: int) -> grain.DatasetIterator:
    """This process's share of the global batch, forever; checkpointable state."""

  @abc.abstractmethod
  def eval_data(self, process_index: int, process_count: int):
    """A finite iterable of this process's eval batches (same layout as train)."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array,
           train: bool) -> tuple[jax.Array, dict]:
    """Scalar loss to minimise, and scalar metrics to report (means over the batch)."""

  @abc.abstractmethod
  def flops_per_example(self) -> float:
    """Model FLOPs of one training example, forward + backward (for MFU)."""

  @abc.abstractmethod
  def activation_bytes(self, examples_per_device: int) -> int:
    """Analytic activation memory of a train step on one device."""

  def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global train batch of `batch_size` (plan mode compiles on them)."""
    raise NotImplementedError(f'{type(self).__module__}.{type(self).__name__} does not declare '
                              'batch_shapes, which --mode=plan needs')

  def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid global batch of `batch_shapes` with random content, for benchmarks (no data read)."""
    raise NotImplementedError(f'{type(self).__module__}.{type(self).__name__} does not declare '
                              'synthetic_batch, which benchmarks/mfu.py needs')

  def tokens_per_example(self) -> int:
    """Sequence length of one example, for tokens/day in plans (0: not a token model)."""
    return 0

  def prerequisites(self, workdir: str) -> dict[str, tuple]:
    """Runs this task starts from: {top-level param name: (config, workdir[, subtree])}.

    Before training from scratch, the trainer trains (or resumes, or finds
    finished) each run and copies its final params (or their top-level
    `subtree`) into that name, e.g. a frozen tokenizer inside a world model or
    a trained core under a new session's embeddings. Freeze it with a group
    of lr_scale 0.
    """
    del workdir
    return {}

  def evaluate(self, model: nnx.Module) -> dict[str, float]:
    """Metrics beyond the loss (generation, probes), from this process's eval data."""
    del model
    return {}

  def describe_lines(self, rows: list[tuple]) -> list[str]:
    """Extra `--mode=describe` lines from the parameter rows (path, shape, axes, spec, count, shards)."""
    del rows
    return []

  def batch_axes(self, batch: dict) -> dict:
    """Logical axes of each batch entry; by default only dim 0 ('batch') is sharded."""
    return {k: ('batch',) + (None,) * (v.ndim - 1) for k, v in batch.items()}


def get_task(config) -> Task:
  """The Task of `config.task` = 'family' or 'family.Class': brainscale/<family>/task.py:Class."""
  if not config.task:
    raise ConfigError('config.task is empty; an experiment must name its task family')
  family, _, name = config.task.partition('.')
  try:
    module = importlib.import_module(f'brainscale.{family}.task')
  except ModuleNotFoundError as e:
    if e.name and e.name.startswith(f'brainscale.{family}'):
      raise ConfigError(f'config.task={config.task!r} has no brainscale/{family}/task.py') from e
    raise
  name = name or 'Task'
  if not isinstance(getattr(module, name, None), type):
    raise ConfigError(f'config.task={config.task!r}: brainscale/{family}/task.py has no class {name}')
  return getattr(module, name)(config)
