"""Parameters with logical axis names, and RMSNorm.

Every parameter carries `axes`, one logical name per dimension; the rules in
`config.mesh.rules` turn them into shardings (brainscale.parallel).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from brainscale.parallel import NORM


def param(rngs: nnx.Rngs, shape: tuple, axes: tuple, *, fan_in: int | None = None,
          init: str = 'normal', dtype=jnp.float32) -> nnx.Param:
  """A parameter of `shape` with logical `axes`.

  'normal' draws a truncated normal with std 1/sqrt(fan_in) (fan_in defaults
  to the first dimension); 'ones' and 'zeros' are constants.
  """
  if len(shape) != len(axes):
    raise ValueError(f'parameter shape {shape} and axes {axes} differ in rank')
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  elif init == 'normal':
    std = (fan_in or shape[0]) ** -0.5
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
  else:
    raise ValueError(f'init={init!r}; expected normal, ones or zeros')
  return nnx.Param(value, axes=tuple(axes))


def axes_of(variable: nnx.Variable) -> tuple:
  return variable.get_metadata()['axes']


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = NORM,
               rngs: nnx.Rngs):
    self.scale_D = param(rngs, (dim,), (axis_name,), init='ones')
    self.eps = eps

  def __call__(self, x_xD: jax.Array) -> jax.Array:
    x32 = x_xD.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv_rms * self.scale_D[...].astype(jnp.float32)).astype(x_xD.dtype)
