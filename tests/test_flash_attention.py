"""Flash attention (kernels/flash_attention.py) against the XLA reference, interpreted on CPU.

The reference is brainscale.nn.attention.attend_xla, itself tested against numpy
in test_nn_attend.py. Sequence lengths are odd (not multiples of any tile) and the
forward and backward tiles differ, so padding and both block tables are used.
"""

import contextlib
import functools
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from brainscale import nn, parallel
from brainscale.nn.attention import Mask, attend_xla
from brainscale.plan import plan
from brainscale.train import loop, report
from conftest import ROOT
from experiments import base
from kernels import flash_attention as fa
from test_train import smoke

# Tolerances per input dtype, against the reference computed in fp32 from the same inputs.
TOL = {
    jnp.float32: dict(out=dict(rtol=2e-5, atol=2e-5), grad=dict(rtol=1e-4, atol=1e-4)),
    # bf16: p and dS are rounded to bf16 before their matmuls (as in every flash kernel).
    jnp.bfloat16: dict(out=dict(rtol=2e-2, atol=2e-2), grad=dict(rtol=3e-2, atol=5e-2)),
}
TILES = fa.Blocks(q=32, k=16, q_bwd=16, k_bwd=32)


def normal(rng, *shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def times(rng, b, n):
  """Increasing sample times in seconds (Enigma's token times)."""
  return jnp.asarray(np.cumsum(rng.uniform(0.02, 0.1, (b, n)), axis=1), jnp.float32)


def case(name, rng, b):
  """(Mask, T, S) for a named masking scenario."""
  t = s = 45
  if name == 'none':
    return Mask(), t, s
  if name == 'causal':
    return Mask(causal=True), t, s
  if name == 'causal_window':
    return Mask(causal=True, window=7), t, s
  if name == 'window':
    return Mask(window=9.5), t, s
  if name == 'time_window':               # Enigma's local attention: a window in seconds
    pos = times(rng, b, t)
    return Mask(window=0.5, q_pos_BxT=pos, kv_pos_BxS=pos), t, s
  if name == 'padding':
    valid = rng.random((b, s)) < 0.7
    valid[:, 0] = True
    return Mask(kv_valid_BxS=jnp.asarray(valid)), t, s
  if name == 'segments':                  # packed sequences
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1))
    return Mask(causal=True, q_segments_BxT=seg, kv_segments_BxS=seg), t, s
  if name == 'shared_prefix':             # CWM's parallel probes: one context, many queries
    seg = np.concatenate([np.zeros((b, 13), int),
                          np.sort(rng.integers(1, 5, (b, t - 13)), axis=1)], axis=1)
    seg = jnp.asarray(seg)
    return Mask(causal=True, q_segments_BxT=seg, kv_segments_BxS=seg, shared_segment=0), t, s
  if name == 'cross':                     # Enigma's decoder: queries over valid tokens
    valid = rng.random((b, 50)) < 0.8
    return Mask(kv_valid_BxS=jnp.asarray(valid)), 21, 50
  if name == 'cross_time_window':
    return Mask(causal=True, window=0.4, q_pos_BxT=times(rng, b, 21),
                kv_pos_BxS=times(rng, b, 50)), 21, 50
  raise KeyError(name)


CASES = ['none', 'causal', 'causal_window', 'window', 'time_window', 'padding', 'segments',
         'shared_prefix', 'cross', 'cross_time_window']


def flash(q, k, v, mask, blocks=TILES):
  return fa.attention(q, k, v, causal=mask.causal, window=mask.window,
                      q_pos_BxT=mask.q_pos_BxT, kv_pos_BxS=mask.kv_pos_BxS,
                      kv_valid_BxS=mask.kv_valid_BxS, q_segments_BxT=mask.q_segments_BxT,
                      kv_segments_BxS=mask.kv_segments_BxS,
                      shared_segment=mask.shared_segment, blocks=blocks)


@functools.partial(jax.jit, static_argnums=(0,))
def vjp(fn, q, k, v, mask, ct):
  out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
  return out, pullback(ct)


def check(rng, mask, t, s, b, n, kv, h, dtype):
  q, k, v = (normal(rng, b, t, n, h, dtype=dtype), normal(rng, b, s, kv, h, dtype=dtype),
             normal(rng, b, s, kv, h, dtype=dtype))
  ct = normal(rng, b, t, n, h, dtype=dtype)
  out, grads = vjp(flash, q, k, v, mask, ct)
  f32 = lambda x: x.astype(jnp.float32)
  out_ref, grads_ref = vjp(attend_xla, f32(q), f32(k), f32(v), mask, f32(ct))
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  np.testing.assert_allclose(f32(out), out_ref, **TOL[dtype]['out'])
  for name, g, g_ref in zip('qkv', grads, grads_ref):
    np.testing.assert_allclose(f32(g), g_ref, **TOL[dtype]['grad'], err_msg=f'd{name}')
  return out


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('name', CASES)
def test_matches_xla_reference(rng, name, dtype):
  """4 query heads over 2 key/value heads, head dim 32."""
  mask, t, s = case(name, rng, 2)
  check(rng, mask, t, s, b=2, n=4, kv=2, h=32, dtype=dtype)


@pytest.mark.parametrize('name', ['causal', 'segments', 'cross'])
@pytest.mark.parametrize('kv', [8, 1])
def test_gqa_ratios(rng, name, kv):
  """8 query heads over 8 (MHA) or 1 (MQA) key/value heads; head dim 24 is padded to 32."""
  mask, t, s = case(name, rng, 1)
  check(rng, mask, t, s, b=1, n=8, kv=kv, h=24, dtype=jnp.float32)


def test_default_tiles_on_a_longer_sequence(rng):
  """The default tiles (128 x 64 forward, 64 x 64 backward) over 300 causal tokens."""
  check(rng, Mask(causal=True, window=100), 300, 300, b=1, n=2, kv=1, h=64,
        dtype=jnp.bfloat16)


def test_rows_that_see_no_key_are_zero_with_zero_gradients(rng):
  b, t, n, h = 2, 40, 2, 16
  valid = np.ones((b, t), bool)
  valid[1] = False                                    # batch 1: every key is padding
  pos = times(rng, b, t)
  mask = Mask(causal=True, q_pos_BxT=pos, kv_pos_BxS=pos + 0.5 * (pos >= pos[:, 20:21]),
              kv_valid_BxS=jnp.asarray(valid))        # batch 0: late queries lose early keys
  out = check(rng, mask, t, t, b=b, n=n, kv=n, h=h, dtype=jnp.float32)
  np.testing.assert_array_equal(out[1], 0.0)
  sees = np.asarray(mask.dense(b, t, t).any(-1))
  assert not sees[1].any() and sees[0].any()
  q, k, v = (normal(rng, b, t, n, h) for _ in range(3))
  _, (dq, dk, dv) = vjp(flash, q, k, v, mask, normal(rng, b, t, n, h))
  for g in (dq[1], dk[1], dv[1]):
    np.testing.assert_array_equal(g, 0.0)


def test_skipped_blocks_are_never_read(rng):
  """NaN keys and values in blocks that no query sees cannot reach the output or gradients."""
  b, t, n, h = 1, 64, 2, 16
  valid = np.arange(t)[None] < 32                      # key blocks 2 and 3 (of 16) are padding
  q, k, v = (normal(rng, b, t, n, h) for _ in range(3))
  poison = jnp.asarray(~valid)[:, :, None, None]
  k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
  mask = Mask(causal=True, kv_valid_BxS=jnp.asarray(valid))
  tiles = fa.Blocks(q=16, k=16, q_bwd=16, k_bwd=16)
  ct = normal(rng, b, t, n, h)
  out, (dq, dk, dv) = vjp(functools.partial(flash, blocks=tiles), q, k_nan, v_nan, mask, ct)
  out_ref, (dq_ref, dk_ref, dv_ref) = vjp(attend_xla, q, k, v, mask, ct)
  np.testing.assert_allclose(out, out_ref, **TOL[jnp.float32]['out'])
  np.testing.assert_allclose(dq, dq_ref, **TOL[jnp.float32]['grad'])
  np.testing.assert_array_equal(dk[:, 32:], 0.0)
  np.testing.assert_array_equal(dv[:, 32:], 0.0)


def _table(mask, t, s, bq, bk):
  st = fa._Static(causal=mask.causal, window=mask.window, shared_segment=mask.shared_segment,
                  scale=1.0, groups=1, blocks=fa.Blocks(), interpret=True)
  pos_t, pos_s = jnp.arange(t, dtype=jnp.float32)[None], jnp.arange(s, dtype=jnp.float32)[None]
  seg_t = jnp.zeros((1, t), jnp.int32) if mask.q_segments_BxT is None else mask.q_segments_BxT
  seg_s = jnp.zeros((1, s), jnp.int32) if mask.kv_segments_BxS is None else mask.kv_segments_BxS
  kind, lo, hi = fa.block_table(pos_t, seg_t, pos_s, seg_s, st, bq, bk)
  return np.asarray(kind[0]), np.asarray(lo[0]), np.asarray(hi[0])


def test_block_table_classifies_causal_window_and_segments():
  S, P, F = fa.SKIP, fa.PARTIAL, fa.FULL
  kind, lo, hi = _table(Mask(causal=True), 64, 64, 16, 16)
  np.testing.assert_array_equal(kind, [[P, S, S, S], [F, P, S, S], [F, F, P, S], [F, F, F, P]])
  np.testing.assert_array_equal(lo, [0, 0, 0, 0])
  np.testing.assert_array_equal(hi, [1, 2, 3, 4])
  kind, lo, hi = _table(Mask(causal=True, window=16), 64, 64, 16, 16)
  np.testing.assert_array_equal(kind, [[P, S, S, S], [P, P, S, S], [S, P, P, S], [S, S, P, P]])
  np.testing.assert_array_equal(lo, [0, 0, 1, 2])
  # One shared context (segment 0) and two query segments: no block crosses the two.
  seg = jnp.asarray([[0] * 16 + [1] * 16 + [2] * 32])
  kind, lo, hi = _table(Mask(q_segments_BxT=seg, kv_segments_BxS=seg, shared_segment=0),
                        64, 64, 16, 16)
  np.testing.assert_array_equal(kind, [[F, S, S, S], [F, F, S, S], [F, S, F, F], [F, S, F, F]])
  np.testing.assert_array_equal(hi, [1, 2, 4, 4])


def test_saves_only_output_and_logsumexp(capsys):
  """The backward keeps q, k, v, the output and the lse: nothing of size T x S."""
  t = 96
  q, k, v = (jnp.ones((1, t, 2, 16)) for _ in range(3))
  jax.ad_checkpoint.print_saved_residuals(
      lambda q, k, v: flash(q, k, v, Mask(causal=True)).sum(), q, k, v)
  shapes = re.findall(r'\[([\d,]+)\]', capsys.readouterr().out)
  sizes = [math.prod(int(d) for d in s.split(',')) for s in shapes]
  assert shapes and max(sizes) <= t * 2 * 16, shapes


def test_rejects_bad_shapes_and_tiles(rng):
  q, k = normal(rng, 1, 8, 4, 16), normal(rng, 1, 8, 3, 16)
  with pytest.raises(ValueError, match='K dividing N'):
    fa.attention(q, k, k)
  with pytest.raises(ValueError, match='power of two'):
    fa.attention(q, q, q, blocks=fa.Blocks(q=24))


@pytest.mark.parametrize('name', ['causal', 'shared_prefix', 'cross_time_window'])
def test_pallas_backend_on_a_mesh_matches_xla(rng, name):
  """Under a (data 2, fsdp 2, tensor 2) mesh each device runs the kernel on its shards."""
  mesh = parallel.make_mesh(_mesh_config(), jax.devices()[:8])
  rules = parallel.rules_table(dict(batch='data,fsdp', act_heads='tensor'))
  mask, t, s = case(name, rng, 4)
  q, k, v = normal(rng, 4, t, 4, 16), normal(rng, 4, s, 2, 16), normal(rng, 4, s, 2, 16)
  ct = normal(rng, 4, t, 4, 16)

  def attend(backend):
    def fn(q, k, v, mask):
      return nn.attend(q, k, v, mask, backend)
    return fn

  with parallel.axis_rules(mesh, rules):
    out, grads = vjp(attend('pallas'), q, k, v, mask, ct)
    text = jax.jit(attend('pallas')).lower(q, k, v, mask).as_text()
  out_ref, grads_ref = vjp(attend('xla'), q, k, v, mask, ct)
  assert 'shard_map' in text or 'sdy.manual_computation' in text
  np.testing.assert_allclose(out, out_ref, **TOL[jnp.float32]['out'])
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, **TOL[jnp.float32]['grad'])


def _mesh_config():
  c = ml_collections.ConfigDict()
  c.dcn = dict(data=1, fsdp=1, sequence=1, tensor=1)
  c.ici = dict(data=2, fsdp=2, sequence=1, tensor=2)
  return ml_collections.ConfigDict(c)


@pytest.mark.slow
def test_smoke_model_trains_the_same_with_pallas_and_xla(tmp_path):
  """Six fp32 training steps of the smoke model (GQA, causal) on a 2 x 2 x 2 mesh."""
  losses = {}
  for backend in ('xla', 'pallas'):
    c = smoke(model__attention=backend, model__compute_dtype='float32', train__steps=6,
              train__log_every=1, train__eval_every=6)
    c.mesh.ici.data, c.mesh.ici.fsdp, c.mesh.ici.tensor = 2, 2, 2
    loop.train(c, str(tmp_path / backend))
    rows = report.read_jsonl(tmp_path / backend / 'metrics.jsonl')
    losses[backend] = [rows[step]['train/loss'] for step in range(1, 7)]
  assert losses['xla'][-1] < losses['xla'][0] - 0.2       # it is learning
  np.testing.assert_allclose(losses['pallas'], losses['xla'], rtol=1e-4)


@pytest.mark.slow
def test_attention_and_loss_benchmarks_run_their_cpu_smoke_shapes():
  for script, expect in (('attention.py', r'smoke \| xla/pallas temp memory [\d.]+x'),
                         ('loss.py', r'smoke: naive/chunked temp memory [\d.]+x')):
    done = subprocess.run([sys.executable, f'benchmarks/{script}', '--shapes=smoke',
                           '--repeats=1'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(expect, done.stdout), done.stdout


def _kernel_calls(jaxpr, counts=None) -> dict:
  """Live pallas_call equations of each kernel name in a jaxpr (loop bodies counted once)."""
  counts = {} if counts is None else counts
  for eqn in plan.live_eqns(jaxpr):
    if eqn.primitive.name == 'pallas_call':
      counts[eqn.params['name']] = counts.get(eqn.params['name'], 0) + 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      _kernel_calls(sub, counts)
  return counts


@pytest.mark.parametrize('on_mesh', [False, True])
def test_save_attention_remat_never_reruns_the_forward_kernel(rng, on_mesh):
  """'full' recomputes the flash forward in the backward; 'save_attention' keeps its residuals."""
  x_BxTxD, ct_BxTxD = normal(rng, 4, 64, 32), normal(rng, 4, 64, 32)
  rules = parallel.rules_table(base.get_config().mesh.rules)
  context = lambda: (parallel.axis_rules(parallel.make_mesh(_mesh_config(), jax.devices()[:8]),
                                         rules) if on_mesh else contextlib.nullcontext())
  results = {}
  for remat in ('full', 'save_attention'):
    stack = nn.Stack(lambda r: nn.Block(32, 4, 8, 64, num_kv_heads=2, backend='pallas', rngs=r),
                     2, remat=remat, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(stack)

    def loss(state, x):
      return jnp.sum(nnx.merge(graphdef, state)(x, mask=Mask(causal=True)) * ct_BxTxD)

    with context():
      grad = jax.grad(loss, argnums=(0, 1))
      results[remat] = (_kernel_calls(jax.make_jaxpr(grad)(state, x_BxTxD).jaxpr),
                        jax.jit(grad)(state, x_BxTxD))
  assert results['full'][0] == {'flash_attention_fwd': 2, 'flash_attention_dq': 1,
                                'flash_attention_dkv': 1}
  assert results['save_attention'][0] == {'flash_attention_fwd': 1, 'flash_attention_dq': 1,
                                          'flash_attention_dkv': 1}
  for g, g_ref in zip(jax.tree.leaves(results['save_attention'][1]),
                      jax.tree.leaves(results['full'][1])):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
