"""AdamW with linear warmup and cosine decay, global-norm clipping and parameter groups.

Groups come from `config.train.groups`: each names a regex on the parameter
path ('blocks/layers/attn/w_q_DxNxH') with its own learning-rate scale and
weight decay; lr_scale 0 freezes the group (no update, no optimizer state).
Frozen groups are matched first, so freezing a subtree also freezes the
parameters of it that another group names (e.g. the norms of a frozen
tokenizer); otherwise the first matching group wins. The rest use the defaults.
A frozen prerequisite (train/prerequisites.py) adds its own frozen group, named after
its top-level parameter, so no experiment writes a freeze regex for it.
"""

import re

import jax
import ml_collections
import optax

from brainscale.config import ConfigError


def schedule(c) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine to `learning_rate * min_lr_ratio`."""
  t = c.train
  warmup = max(min(t.warmup_steps, t.steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(t.steps, warmup + 1), end_value=t.learning_rate * t.min_lr_ratio)


def path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def group_of(names: list[str], groups) -> list[str]:
  """The group of each parameter path ('default' when no pattern matches).

  A group whose pattern matches no parameter at all is a ConfigError: a freeze that
  freezes nothing, or a no-decay that exempts nothing, would otherwise pass unnoticed.
  """
  ordered = sorted(groups.items(), key=lambda item: item[1].lr_scale != 0)  # frozen first
  compiled = [(name, re.compile(g.pattern)) for name, g in ordered]
  for name, rx in compiled if names else ():
    if not any(rx.search(n) for n in names):
      raise ConfigError(f'train.groups.{name}.pattern={rx.pattern!r} matches no parameter; '
                        f'expected a regex on paths like {names[0]!r} ({len(names)} parameters)')
  return [next((g for g, rx in compiled if rx.search(n)), 'default') for n in names]


def group_labels(params, groups) -> dict:
  """The group name of every parameter, as a tree like `params`."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  labels = group_of([path_name(p) for p, _ in paths], groups)
  return jax.tree_util.tree_unflatten(treedef, labels)


def groups(c, frozen=()) -> dict:
  """`c.train.groups` after a frozen group '^NAME/' for each top-level parameter in `frozen`.

  The group is named NAME, as the optimizer state of a checkpoint names it.
  """
  out = {name: ml_collections.ConfigDict(dict(pattern=f'^{name}/', lr_scale=0.0,
                                              weight_decay=0.0))
         for name in frozen}
  for name, g in c.train.groups.items():
    if name in out and (g.pattern, g.lr_scale) != (out[name].pattern, 0.0):
      raise ConfigError(f'train.groups.{name} is the group of the frozen prerequisite {name!r}; '
                        'name the group otherwise')
    out.setdefault(name, g)
  return out


def make(c, frozen=()) -> optax.GradientTransformation:
  """The optimizer of config `c`, with the top-level parameters in `frozen` frozen."""
  t = c.train
  lr = schedule(c)
  named = groups(c, frozen)

  def adamw(lr_scale: float, weight_decay: float):
    if lr_scale == 0:  # frozen: no update and no optimizer state
      return optax.set_to_zero()
    return optax.adamw(lambda step: lr(step) * lr_scale, b1=t.b1, b2=t.b2,
                       weight_decay=weight_decay)

  transforms = {'default': adamw(1.0, t.weight_decay)}
  for name, g in named.items():
    transforms[name] = adamw(g.lr_scale, g.weight_decay)
  tx = optax.multi_transform(transforms, lambda p: group_labels(p, named))
  if t.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  return tx
