"""Flash attention in Pallas: forward and backward, for brainscale.nn.attention's `pallas` backend.

Each program holds one block of queries in fast memory and walks over the key
blocks with an online softmax (running max `m`, running sum `l`, fp32
accumulator), so no [T, S] score matrix is ever written; the forward saves only
its output and the log-sum-exp per query, and the backward recomputes the
scores block by block (one kernel for dQ over key blocks, one for dK/dV over
query blocks, so no atomics).

Masks come as per-token vectors, never as a [T, S] array: a position per query
and per key (token index, or a time in samples for Enigma's time windows), and a
segment id per query and per key (key padding is a key segment no query has).
Before the kernels run, a [B, T/bq, S/bk] table classifies each block pair from
the min/max of positions and segments inside the two blocks: SKIP (no query
sees any key: never loaded), FULL (every query sees every key: no elementwise
mask) or PARTIAL; each query block walks only from its first to its last
visible key block. Causal and sliding-window masks skip about half and almost
all of the pairs; segments skip whatever their ranges do not overlap.

Lowering. On CPU the same kernel bodies run through `interpret=True`
(chosen automatically), which is how CI checks them. On NVIDIA GPUs they lower
through Pallas' Triton backend (`pltriton.CompilerParams`). Pallas' other GPU
lowering, Mosaic GPU, is the faster road on Hopper (explicit TMA, wgmma and
warp specialisation) but is written against a different model (`plgpu.kernel`,
warpgroup-level arrays and barriers) whose kernels this CPU-only CI cannot run;
the Triton lowering takes exactly the blocked, BlockSpec-style bodies that the
interpreter checks here, and Triton emits wgmma on sm_90 for bf16 dots. JAX
marks that lowering deprecated from 0.11, so the Mosaic GPU port is the next
step once its speed on H100/H200 has been measured against cuDNN
(benchmarks/attention.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

# The forward's residuals carry this checkpoint name, so a remat policy that saves it
# (nn's 'save_attention') keeps them and the backward never reruns the forward kernel.
RESIDUALS = 'flash_residuals'

try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # a JAX without the Triton lowering; interpret mode still works
  pltriton = None

SKIP, PARTIAL, FULL = 0, 1, 2
KV_PAD = -2**31       # segment of a padded or invalid key: no query has it
Q_PAD = -2**31 + 1    # segment of a padded query row: matches no key


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two) and Triton launch parameters."""
  q: int = 128            # forward: queries per program
  k: int = 64             # forward: keys per step
  q_bwd: int = 64         # backward: queries per step (dK/dV) or program (dQ)
  k_bwd: int = 64         # backward: keys per program (dK/dV) or step (dQ)
  num_warps: int | None = None   # None: 4 for head_dim <= 64, else 8
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on."""
  causal: bool
  window: float | None
  shared_segment: int | None
  scale: float
  groups: int              # query heads per key/value head
  blocks: Blocks
  interpret: bool


def _visible(q_pos, q_seg, k_pos, k_seg, st: _Static):
  """[bq, bk] bool: which of these keys each of these queries sees."""
  ok = q_seg[:, None] == k_seg[None, :]
  if st.shared_segment is not None:
    ok |= (k_seg == st.shared_segment)[None, :]
  delta = q_pos[:, None] - k_pos[None, :]
  if st.causal:
    ok &= delta >= 0
  if st.window is not None:
    ok &= delta < st.window
    if not st.causal:
      ok &= delta > -st.window
  return ok


def _dot(a, b, ta=False, tb=False):
  """a @ b (optionally transposed operands) accumulated in fp32."""
  dims = (((0,) if ta else (1,)), ((1,) if tb else (0,)))
  return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _walk(kind_ref, lo, hi, step, carry):
  """Runs step(j, masked, carry) over blocks lo..hi-1, skipping SKIP blocks."""
  def body(j, carry):
    return lax.switch(kind_ref[j], [lambda c: c, functools.partial(step, j, True),
                                    functools.partial(step, j, False)], carry)
  return lax.fori_loop(lo, hi, body, carry)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(kind_ref, lo_ref, hi_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
  bk = st.blocks.k
  q_QxH = q_ref[...]
  q_pos, q_seg = qpos_ref[...], qseg_ref[...]
  bq, h = q_QxH.shape

  def step(j, masked, carry):
    acc_QxH, m_Q, l_Q = carry
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k_KxH, v_KxH = k_ref[keys, :], v_ref[keys, :]
    s_QxK = _dot(q_QxH, k_KxH, tb=True) * st.scale
    if masked:
      ok = _visible(q_pos, q_seg, kpos_ref[keys], kseg_ref[keys], st)
      s_QxK = jnp.where(ok, s_QxK, -jnp.inf)
    m_new_Q = jnp.maximum(m_Q, s_QxK.max(-1))
    m_safe_Q = jnp.where(m_new_Q == -jnp.inf, 0.0, m_new_Q)   # rows that saw nothing yet
    p_QxK = jnp.exp(s_QxK - m_safe_Q[:, None])
    alpha_Q = jnp.exp(m_Q - m_safe_Q)
    acc_QxH = alpha_Q[:, None] * acc_QxH + _dot(p_QxK.astype(v_KxH.dtype), v_KxH)
    return acc_QxH, m_new_Q, alpha_Q * l_Q + p_QxK.sum(-1)

  init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc_QxH, m_Q, l_Q = _walk(kind_ref, lo_ref[...], hi_ref[...], step, init)
  seen_Q = l_Q > 0
  l_Q = jnp.where(seen_Q, l_Q, 1.0)
  o_ref[...] = (acc_QxH / l_Q[:, None]).astype(o_ref.dtype)
  # A query that sees no key: output 0, and lse +inf so that the backward's p is 0.
  lse_ref[...] = jnp.where(seen_Q, m_Q + jnp.log(l_Q), jnp.inf)


def _dq_kernel(kind_ref, lo_ref, hi_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static):
  bk = st.blocks.k_bwd
  q_QxH, do_QxH = q_ref[...], do_ref[...]
  lse_Q, delta_Q = lse_ref[...], delta_ref[...]
  q_pos, q_seg = qpos_ref[...], qseg_ref[...]

  def step(j, masked, dq_QxH):
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k_KxH, v_KxH = k_ref[keys, :], v_ref[keys, :]
    p_QxK = jnp.exp(_dot(q_QxH, k_KxH, tb=True) * st.scale - lse_Q[:, None])
    if masked:
      p_QxK = jnp.where(_visible(q_pos, q_seg, kpos_ref[keys], kseg_ref[keys], st), p_QxK, 0.0)
    dp_QxK = _dot(do_QxH, v_KxH, tb=True)
    ds_QxK = p_QxK * (dp_QxK - delta_Q[:, None])
    return dq_QxH + _dot(ds_QxK.astype(k_KxH.dtype), k_KxH)

  dq_QxH = _walk(kind_ref, lo_ref[...], hi_ref[...], step,
                 jnp.zeros(q_QxH.shape, jnp.float32))
  dq_ref[...] = (dq_QxH * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(kind_ref, lo_ref, hi_ref, kpos_ref, kseg_ref, qpos_ref, qseg_ref,
                k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                st: _Static):
  bq = st.blocks.q_bwd
  k_KxH, v_KxH = k_ref[...], v_ref[...]
  k_pos, k_seg = kpos_ref[...], kseg_ref[...]
  lo, hi = lo_ref[...], hi_ref[...]
  dk_KxH = jnp.zeros(k_KxH.shape, jnp.float32)
  dv_KxH = jnp.zeros(v_KxH.shape, jnp.float32)
  for g in range(st.groups):   # the query heads that share this key/value head

    def step(i, masked, carry, g=g):
      dk_KxH, dv_KxH = carry
      rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
      q_QxH, do_QxH = q_ref[rows, g, :], do_ref[rows, g, :]
      lse_Q, delta_Q = lse_ref[g, rows], delta_ref[g, rows]
      p_QxK = jnp.exp(_dot(q_QxH, k_KxH, tb=True) * st.scale - lse_Q[:, None])
      if masked:
        p_QxK = jnp.where(_visible(qpos_ref[rows], qseg_ref[rows], k_pos, k_seg, st),
                          p_QxK, 0.0)
      dv_KxH += _dot(p_QxK.astype(do_QxH.dtype), do_QxH, ta=True)
      ds_QxK = p_QxK * (_dot(do_QxH, v_KxH, tb=True) - delta_Q[:, None])
      dk_KxH += _dot(ds_QxK.astype(q_QxH.dtype), q_QxH, ta=True)
      return dk_KxH, dv_KxH

    dk_KxH, dv_KxH = _walk(kind_ref, lo, hi, step, (dk_KxH, dv_KxH))
  dk_ref[...] = (dk_KxH * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KxH.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- block tables

def _stats(pos_BxL, seg_BxL, block: int):
  """Per block: (pos min, pos max, seg min, seg max), each [B, L/block]."""
  b, n = pos_BxL.shape
  pos, seg = pos_BxL.reshape(b, n // block, block), seg_BxL.reshape(b, n // block, block)
  return pos.min(-1), pos.max(-1), seg.min(-1), seg.max(-1)


def block_table(q_pos_BxT, q_seg_BxT, k_pos_BxS, k_seg_BxS, st: _Static, bq: int, bk: int):
  """kind [B, T/bq, S/bk] (SKIP / PARTIAL / FULL) and each query block's [lo, hi) key blocks."""
  qp0, qp1, qs0, qs1 = (a[:, :, None] for a in _stats(q_pos_BxT, q_seg_BxT, bq))
  kp0, kp1, ks0, ks1 = (a[:, None, :] for a in _stats(k_pos_BxS, k_seg_BxS, bk))
  # Segments: some pair may match when the id ranges overlap (or a key may be shared).
  none = (qs1 < ks0) | (ks1 < qs0)
  every = (qs0 == qs1) & (ks0 == ks1) & (qs0 == ks0)
  if st.shared_segment is not None:
    sh = st.shared_segment
    none &= (sh < ks0) | (ks1 < sh)
    every |= (ks0 == sh) & (ks1 == sh) & (qs0 != Q_PAD)
  # Positions: delta = q - k ranges over [qp0 - kp1, qp1 - kp0].
  d0, d1 = qp0 - kp1, qp1 - kp0
  if st.causal:
    none |= d1 < 0
    every &= d0 >= 0
  if st.window is not None:
    none |= d0 >= st.window
    every &= d1 < st.window
    if not st.causal:
      none |= d1 <= -st.window
      every &= d0 > -st.window
  kind = jnp.where(none, SKIP, jnp.where(every, FULL, PARTIAL)).astype(jnp.int32)
  return (kind,) + _ranges(kind)


def _ranges(kind_BxIxJ):
  """First and one-past-last visible J per (B, I); (0, 0) when none is."""
  seen = kind_BxIxJ > 0
  n = seen.shape[-1]
  lo = jnp.argmax(seen, -1)
  hi = n - jnp.argmax(seen[..., ::-1], -1)
  anything = seen.any(-1)
  return jnp.where(anything, lo, 0).astype(jnp.int32), jnp.where(anything, hi, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------- pallas_calls

def _params(st: _Static, head_dim: int):
  if st.interpret:
    return {}
  if pltriton is None:
    raise ValueError("attention backend 'pallas' on GPU needs Pallas' Triton lowering "
                     f"(jax.experimental.pallas.triton), absent from jax {jax.__version__}")
  warps = st.blocks.num_warps or (4 if head_dim <= 64 else 8)
  return dict(compiler_params=pltriton.CompilerParams(num_warps=warps,
                                                      num_stages=st.blocks.num_stages))


def _cost(st: _Static, q, k, matmuls: int, exps: int) -> dict:
  """What a kernel does over the visible pairs (half of them when causal): its cost
  estimate, and the same as the metadata its compiled custom call carries, where
  brainscale.plan.hlo reads its FLOPs."""
  b, t, n, h = q.shape
  pairs = b * n * t * k.shape[1] * (0.5 if st.causal else 1.0)
  cost = dict(flops=int(2 * h * matmuls * pairs), transcendentals=int(exps * pairs),
              bytes_accessed=int(2 * (q.size + k.size) * q.dtype.itemsize))
  return dict(cost_estimate=pl.CostEstimate(**cost),
              metadata={key: str(value) for key, value in cost.items()})


def _query_block_specs(s: int, h: int, bq: int, bk: int, g: int) -> list[pl.BlockSpec]:
  """Inputs of a kernel whose program (b, head, i) holds query block i and walks the keys:
  block table row, lo, hi, query positions/segments, all key positions/segments, q, k, v."""
  row = lambda bi, ni, i: (bi, i)
  whole = lambda bi, ni, i: (bi, 0)
  return [pl.BlockSpec((None, None, s // bk), lambda bi, ni, i: (bi, i, 0)),
          pl.BlockSpec((None, None), row), pl.BlockSpec((None, None), row),
          pl.BlockSpec((None, bq), row), pl.BlockSpec((None, bq), row),
          pl.BlockSpec((None, s), whole), pl.BlockSpec((None, s), whole),
          pl.BlockSpec((None, bq, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
          pl.BlockSpec((None, s, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0)),
          pl.BlockSpec((None, s, None, h), lambda bi, ni, i: (bi, 0, ni // g, 0))]


def _forward(q, k, v, aux, st: _Static):
  b, t, n, h = q.shape
  bq = st.blocks.q
  q_pos, q_seg, k_pos, k_seg = aux
  kind, lo, hi = block_table(q_pos, q_seg, k_pos, k_seg, st, st.blocks.q, st.blocks.k)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(b, n, t // bq),
      in_specs=_query_block_specs(k.shape[1], h, bq, st.blocks.k, st.groups),
      out_specs=[
          pl.BlockSpec((None, bq, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
          pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      interpret=st.interpret, name='flash_attention_fwd', **_params(st, h),
      **_cost(st, q, k, matmuls=2, exps=1),
  )(kind, lo, hi, q_pos, q_seg, k_pos, k_seg, q, k, v)
  return o, lse


def _backward(q, k, v, aux, o, lse, do, st: _Static):
  b, t, n, h = q.shape
  s, kvh = k.shape[1], k.shape[2]
  bq, bk, g = st.blocks.q_bwd, st.blocks.k_bwd, st.groups
  q_pos, q_seg, k_pos, k_seg = aux
  kind, lo, hi = block_table(q_pos, q_seg, k_pos, k_seg, st, bq, bk)   # the backward's tiles
  delta_BxNxT = jnp.einsum('btnh,btnh->bnt', o.astype(jnp.float32), do.astype(jnp.float32))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(b, n, t // bq),
      in_specs=_query_block_specs(s, h, bq, bk, g) + [
          pl.BlockSpec((None, bq, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
          pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
          pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, h), lambda bi, ni, i: (bi, i, ni, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=st.interpret, name='flash_attention_dq', **_params(st, h),
      **_cost(st, q, k, matmuls=3, exps=1),
  )(kind, lo, hi, q_pos, q_seg, k_pos, k_seg, q, k, v, do, lse, delta_BxNxT)

  kind_t, lo_t, hi_t = (kind.transpose(0, 2, 1),) + _ranges(kind.transpose(0, 2, 1))
  row = lambda bi, ki, j: (bi, j)
  whole = lambda bi, ki, j: (bi, 0)
  heads = lambda bi, ki, j: (bi, 0, ki, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(b, kvh, s // bk),
      in_specs=[
          pl.BlockSpec((None, None, t // bq), lambda bi, ki, j: (bi, j, 0)),
          pl.BlockSpec((None, None), row), pl.BlockSpec((None, None), row),
          pl.BlockSpec((None, bk), row), pl.BlockSpec((None, bk), row),
          pl.BlockSpec((None, t), whole), pl.BlockSpec((None, t), whole),
          pl.BlockSpec((None, bk, None, h), lambda bi, ki, j: (bi, j, ki, 0)),
          pl.BlockSpec((None, bk, None, h), lambda bi, ki, j: (bi, j, ki, 0)),
          pl.BlockSpec((None, t, g, h), heads),
          pl.BlockSpec((None, t, g, h), heads),
          pl.BlockSpec((None, g, t), lambda bi, ki, j: (bi, ki, 0)),
          pl.BlockSpec((None, g, t), lambda bi, ki, j: (bi, ki, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, h), lambda bi, ki, j: (bi, j, ki, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=st.interpret, name='flash_attention_dkv', **_params(st, h),
      **_cost(st, q, k, matmuls=4, exps=1),
  )(kind_t, lo_t, hi_t, k_pos, k_seg, q_pos, q_seg, k, v, q, do, lse, delta_BxNxT)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, aux, st):
  return _forward(q, k, v, aux, st)[0]


def _flash_fwd(q, k, v, aux, st):
  o, lse = _forward(q, k, v, aux, st)
  o, lse = checkpoint_name(o, RESIDUALS), checkpoint_name(lse, RESIDUALS)
  return o, (q, k, v, aux, o, lse)   # the output and the log-sum-exp, nothing [T, S]


def _flash_bwd(st, residuals, do):
  q, k, v, aux, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, aux, o, lse, do, st)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- entry point

def _pad_to(x, length: int, axis: int, value=None):
  """Pads `axis` to `length`: with `value`, else by repeating the edge."""
  extra = length - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  if value is None:
    return jnp.pad(x, widths, mode='edge')
  return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _fit(blocks: Blocks, t: int, s: int) -> Blocks:
  """Shrinks tiles for short sequences (never below 16)."""
  cap_t = max(16, pl.next_power_of_2(t))
  cap_s = max(16, pl.next_power_of_2(s))
  return dataclasses.replace(blocks, q=min(blocks.q, cap_t), q_bwd=min(blocks.q_bwd, cap_t),
                             k=min(blocks.k, cap_s), k_bwd=min(blocks.k_bwd, cap_s))


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, causal: bool = False,
              window: float | None = None, q_pos_BxT=None, kv_pos_BxS=None,
              kv_valid_BxS=None, q_segments_BxT=None, kv_segments_BxS=None,
              shared_segment: int | None = None, blocks: Blocks | None = None,
              interpret: bool | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v with the masks of brainscale.nn.attention.Mask.

  K key/value heads serve N // K query heads each (GQA). A query that sees no
  key returns zeros. Differentiable in q, k and v (positions, segments and
  validity are not). `interpret` defaults to True off GPU.
  """
  b, t, n, h = q_BxTxNxH.shape
  s, kvh = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  if k_BxSxKxH.shape != v_BxSxKxH.shape or k_BxSxKxH.shape[::3] != (b, h) or n % kvh:
    raise ValueError(f'q {q_BxTxNxH.shape}, k {k_BxSxKxH.shape}, v {v_BxSxKxH.shape}: '
                     f'expected [B, T, N, H] and two [B, S, K, H] with K dividing N')
  if (q_segments_BxT is None) != (kv_segments_BxS is None):
    raise ValueError('q_segments_BxT and kv_segments_BxS come together')
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  blocks = blocks or Blocks()
  for name in ('q', 'k', 'q_bwd', 'k_bwd'):
    size = getattr(blocks, name)
    if size < 1 or size & (size - 1):
      raise ValueError(f'flash attention block {name}={size}; expected a power of two')
  blocks = _fit(blocks, t, s)
  st = _Static(causal=causal, window=None if window is None else float(window),
               shared_segment=shared_segment, scale=h ** -0.5, groups=n // kvh,
               blocks=blocks, interpret=interpret)

  # Per-token positions and segments; key padding folds into the key segment.
  q_pos = jnp.broadcast_to(jnp.arange(t) if q_pos_BxT is None else q_pos_BxT, (b, t))
  k_pos = jnp.broadcast_to(jnp.arange(s) if kv_pos_BxS is None else kv_pos_BxS, (b, s))
  q_seg = jnp.zeros((b, t), jnp.int32) if q_segments_BxT is None else q_segments_BxT
  k_seg = jnp.zeros((b, s), jnp.int32) if kv_segments_BxS is None else kv_segments_BxS
  q_seg, k_seg = jnp.broadcast_to(q_seg, (b, t)), jnp.broadcast_to(k_seg, (b, s))
  if kv_valid_BxS is not None:
    k_seg = jnp.where(jnp.broadcast_to(kv_valid_BxS, (b, s)), k_seg, KV_PAD)

  # Pad lengths to whole blocks and the head dim to a power of two.
  tp = _round_up(t, max(blocks.q, blocks.q_bwd))
  sp = _round_up(s, max(blocks.k, blocks.k_bwd))
  hp = pl.next_power_of_2(h)
  q = _pad_to(_pad_to(q_BxTxNxH, tp, 1, 0), hp, 3, 0)
  k = _pad_to(_pad_to(k_BxSxKxH, sp, 1, 0), hp, 3, 0)
  v = _pad_to(_pad_to(v_BxSxKxH, sp, 1, 0), hp, 3, 0)
  q_pos = _pad_to(q_pos.astype(jnp.float32), tp, 1)
  k_pos = _pad_to(k_pos.astype(jnp.float32), sp, 1)
  q_seg = _pad_to(q_seg.astype(jnp.int32), tp, 1, Q_PAD)
  k_seg = _pad_to(k_seg.astype(jnp.int32), sp, 1, KV_PAD)

  aux = jax.lax.stop_gradient((q_pos, q_seg, k_pos, k_seg))
  out = _flash(q, k, v, aux, st)
  return out[:, :t, :, :h]


def flops(b: int, t: int, s: int, n: int, h: int, *, causal: bool = False) -> float:
  """Matmul FLOPs of the forward (2 matmuls of 2*T*S*H each per head; half when causal)."""
  return 4.0 * b * n * t * s * h * (0.5 if causal else 1.0)
