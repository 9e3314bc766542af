"""The seam between the trainer and a model family.

A family lives in brainscale/<name>/ and exposes `task.Task`, found from
`config.task` (big_vision style). The trainer calls only what is below, so a
third brain model is a new folder and an experiment file, nothing else. `Costs`
is the optional accounting (FLOPs, memory, tokens) that describe and plan read.
"""

import abc
import importlib

import grain
import jax
import numpy as np
from flax import nnx

from brainscale.config import ConfigError


class Task(abc.ABC):
  """What the trainer needs from a model family: five methods, and two with defaults."""

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
  def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch layout: shape and dtype of each entry of a global batch of `batch_size`
    (dim 0 is the example; plan compiles on it)."""

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: dict, rng: jax.Array,
           train: bool) -> tuple[jax.Array, dict]:
    """Scalar loss to minimise, and scalar metrics to report (means over the batch)."""

  def evaluate(self, model: nnx.Module) -> dict[str, float]:
    """Metrics beyond the loss (generation, probes), from this process's eval data."""
    del model
    return {}

  def prerequisites(self) -> dict:
    """Runs this task starts from: {top-level param name: prerequisites.Prerequisite}.

    Before training from scratch, the trainer trains (or resumes, or finds
    finished) each run first (prerequisites.runs_to_train) and copies its final
    params (or their top-level `subtree`) into that name, e.g. a frozen tokenizer
    inside a world model or a trained core under a new session's embeddings. A
    frozen one gets a group of lr_scale 0 from the trainer (optim.groups).
    """
    return {}


class Costs(abc.ABC):
  """Optional: what describe, plan, MFU logging and the benchmarks read from a task."""

  @abc.abstractmethod
  def flops_per_example(self) -> float:
    """Model FLOPs of one training example, forward + backward (for MFU)."""

  @abc.abstractmethod
  def activation_bytes(self, examples_per_device: int) -> int:
    """Analytic activation memory of a train step on one device."""

  def tokens_per_example(self) -> int:
    """Sequence length of one example, for tokens/day in plans (0: not a token model)."""
    return 0

  def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid global batch of `batch_shapes` with random content, for benchmarks (no data read)."""
    raise NotImplementedError(f'{type(self).__module__}.{type(self).__name__} does not declare '
                              'synthetic_batch, which benchmarks/mfu.py needs')

  def describe_lines(self, rows: list) -> list[str]:
    """Extra `--mode=describe` lines from the parameter rows (describe.ParamRow)."""
    del rows
    return []


def costs(task: Task) -> Costs:
  """The task's Costs, or a one-line ConfigError naming the family that has none."""
  if not isinstance(task, Costs):
    raise ConfigError(f'{type(task).__module__}.{type(task).__name__} declares no costs '
                      '(brainscale.train.task.Costs), which describe, plan and MFU need')
  return task


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
    raise ConfigError(f'config.task={config.task!r}: brainscale/{family}/task.py has no '
                      f'class {name}')
  return getattr(module, name)(config)
