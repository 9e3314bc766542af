"""The task mixture: which inputs each example sees and what it must predict.

  encoding     stimulus (+ behaviour) -> every neuron (the Sensorium task)
  cosmoothing  stimulus, behaviour, a random subset of neurons -> the other neurons
  forecasting  everything before a random split time -> neurons and behaviour after it
  behavior     stimulus and all neurons -> behaviour

The video is always seen. A task is drawn per example from `weights`.
"""

import dataclasses

import jax
import jax.numpy as jnp

TASKS = ('encoding', 'cosmoothing', 'forecasting', 'behavior')


@dataclasses.dataclass(frozen=True)
class Masks:
  task_B: jax.Array
  neuron_in_BxWxM: jax.Array
  behavior_in_BxWxC: jax.Array
  neuron_target_BxWxM: jax.Array
  behavior_target_BxWxC: jax.Array


jax.tree_util.register_dataclass(Masks, data_fields=[f.name for f in dataclasses.fields(Masks)],
                                 meta_fields=[])


def for_task(task_B: jax.Array, batch: dict, key: jax.Array, *,
             visible: tuple[float, float] = (0.2, 0.8),
             split: tuple[float, float] = (0.25, 0.75)) -> Masks:
  """Masks of each example's task (ids into TASKS).

  cosmoothing shows each neuron with a probability drawn from `visible`;
  forecasting splits the window at a fraction drawn from `split`.
  """
  responses_ok = batch['responses_mask']
  behavior_ok = batch['behavior_mask']
  b, w, m = responses_ok.shape
  k_frac, k_show, k_split = jax.random.split(key, 3)
  frac_B = jax.random.uniform(k_frac, (b,), minval=visible[0], maxval=visible[1])
  shown_BxM = jax.random.uniform(k_show, (b, m)) < frac_B[:, None]
  cut_B = jnp.floor(w * jax.random.uniform(k_split, (b,), minval=split[0], maxval=split[1]))
  before_BxW = jnp.arange(w)[None] < cut_B[:, None]

  is_ = {name: (task_B == i)[:, None, None] for i, name in enumerate(TASKS)}
  none_n, none_b = jnp.zeros_like(responses_ok), jnp.zeros_like(behavior_ok)
  neuron_in = jnp.select(
      [is_['encoding'], is_['cosmoothing'], is_['forecasting'], is_['behavior']],
      [none_n, responses_ok & shown_BxM[:, None], responses_ok & before_BxW[..., None],
       responses_ok])
  neuron_target = jnp.select(
      [is_['encoding'], is_['cosmoothing'], is_['forecasting'], is_['behavior']],
      [responses_ok, responses_ok & ~shown_BxM[:, None], responses_ok & ~before_BxW[..., None],
       none_n])
  behavior_in = jnp.select(
      [is_['forecasting'], is_['behavior']],
      [behavior_ok & before_BxW[..., None], none_b], behavior_ok)
  behavior_target = jnp.select(
      [is_['forecasting'], is_['behavior']],
      [behavior_ok & ~before_BxW[..., None], behavior_ok], none_b)
  return Masks(task_B, neuron_in, behavior_in, neuron_target, behavior_target)


def sample(batch: dict, key: jax.Array, weights: tuple[float, ...], **kwargs) -> Masks:
  """A task per example, drawn with probabilities proportional to `weights` (one per TASKS)."""
  if len(weights) != len(TASKS) or min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f'task weights {tuple(weights)}: expected {len(TASKS)} non-negative '
                     f'numbers, one per {TASKS}, not all zero')
  k_task, k_masks = jax.random.split(key)
  b = batch['responses_mask'].shape[0]
  logits = jnp.log(jnp.asarray(weights, jnp.float32))
  task_B = jax.random.categorical(k_task, logits, shape=(b,))
  return for_task(task_B, batch, k_masks, **kwargs)


def fixed(batch: dict, task: str) -> Masks:
  """Every example on one task (evaluation)."""
  b = batch['responses_mask'].shape[0]
  task_B = jnp.full((b,), TASKS.index(task), jnp.int32)
  return for_task(task_B, batch, jax.random.key(0))
