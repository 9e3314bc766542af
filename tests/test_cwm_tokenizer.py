"""Tests of the CWM local patch quantizer (brainscale.cwm.tokenizer).

References are written here in numpy: code <-> bits / base-4 digits, nearest
FSQ level, probs @ codebook, PSNR, entropies. Each test draws fresh inputs from
a seed derived from its node id. Model calls go through one jitted runner so
compiled code is shared between tests.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from brainscale.cwm import tokenizer as tok

EXACT = dict(rtol=0, atol=0)
FP32 = dict(rtol=1e-5, atol=1e-6)
FSQ_VALUES = np.array([-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0], np.float32)   # as the model stores them


def config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(channels=16, depth=1, kernel=1, bits=8, quantizer='lfq',
                                     commit_weight=0.25, entropy_weight=0.1, patch=4))
  c.update(overrides)
  return c


def make(seed, **overrides) -> tok.Tokenizer:
  return tok.Tokenizer(config(**overrides), rngs=nnx.Rngs(seed))


def frames(rng, b, h, w) -> jax.Array:
  return jnp.asarray(rng.integers(0, 256, (b, h, w, 3)), jnp.uint8)


def close(actual, expected, tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             **tol)


# ----------------------------------------------------------------------------- jitted runners

@functools.partial(jax.jit, static_argnums=(0, 1))
def run(fn, graphdef, state, *args):
  """fn(module, *args) with the module rebuilt from (graphdef, state)."""
  return fn(nnx.merge(graphdef, state), *args)


def call(model, fn, *args):
  return run(fn, *nnx.split(model), *args)


def encode(m, x):
  return m.encode(x)


def quantize(m, z):
  return m.quantize(z)


def decode(m, zq):
  return m.decode(zq)


def tokenize(m, x):
  return m.tokenize(x)


def detokenize(m, codes):
  return m.detokenize(codes)


def codes_to_latent(m, codes):
  return m.codes_to_latent(codes)


def codebook(m):
  return m.codebook()


def expected_latent(m, probs):
  return m.expected_latent(probs)


def loss(m, x):
  return m.loss(x)


# ----------------------------------------------------------------------------- numpy references

def ref_digits(codes, levels, n):
  """Base-`levels` digits of codes, least significant first [..., n]."""
  codes = np.asarray(codes, np.int64)[..., None]
  return (codes // levels ** np.arange(n)) % levels


def ref_latent(codes, quantizer, bits):
  if quantizer == 'lfq':
    return 2.0 * ref_digits(codes, 2, bits) - 1.0
  return FSQ_VALUES[ref_digits(codes, 4, bits // 2)]


def ref_bernoulli_entropy(p):
  return -(p * np.log(p) + (1 - p) * np.log(1 - p))


# ----------------------------------------------------------------------------- shapes and config

@pytest.mark.parametrize('quantizer', ['lfq', 'fsq'])
@pytest.mark.parametrize('bits', [16, 6])
def test_shapes_dtypes_and_ranges(seed, rng, quantizer, bits):
  model = make(seed, quantizer=quantizer, bits=bits)
  k = bits if quantizer == 'lfq' else bits // 2
  assert model.vocab == 2 ** bits
  x = frames(rng, 2, 8, 12)
  z = call(model, encode, x)
  assert z.shape == (2, 2, 3, k) and z.dtype == jnp.float32
  zq, codes = call(model, quantize, z)
  assert zq.shape == (2, 2, 3, k) and zq.dtype == jnp.float32
  assert codes.shape == (2, 2, 3) and codes.dtype == jnp.int32
  assert 0 <= int(codes.min()) and int(codes.max()) < 2 ** bits
  image = call(model, decode, zq)
  assert image.shape == (2, 8, 12, 3) and image.dtype == jnp.float32
  assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
  close(call(model, tokenize, x), codes, EXACT)
  close(call(model, detokenize, codes), image, EXACT)


def test_float_frames_in_0_255_match_uint8(seed, rng):
  model = make(seed)
  x = frames(rng, 2, 8, 8)
  close(call(model, encode, x.astype(jnp.float32)), call(model, encode, x), EXACT)


@pytest.mark.parametrize('shape', [(1, 18, 16, 3), (1, 16, 10, 3), (1, 16, 16, 1)])
def test_bad_frame_shape_raises_naming_shape(seed, shape):
  model = make(seed)
  with pytest.raises(ValueError, match=str(shape).replace('(', r'\(').replace(')', r'\)')):
    model.encode(jnp.zeros(shape, jnp.uint8))


@pytest.mark.parametrize('overrides, message', [
    (dict(quantizer='vq'), 'quantizer'), (dict(quantizer='fsq', bits=7), 'even'),
    (dict(kernel=2), 'kernel'), (dict(bits=0), 'bits')])
def test_bad_config_raises(seed, overrides, message):
  with pytest.raises(ValueError, match=message):
    make(seed, **overrides)


# ----------------------------------------------------------------------------- quantization

@pytest.mark.parametrize('quantizer', ['lfq', 'fsq'])
def test_codes_to_latent_of_quantize_is_zq(seed, rng, quantizer):
  model = make(seed, quantizer=quantizer, bits=16)
  z = jnp.asarray(2.0 * rng.standard_normal((3, 4, 5, model.latent_channels)), jnp.float32)
  zq, codes = call(model, quantize, z)
  close(call(model, codes_to_latent, codes), zq, EXACT)
  close(zq, ref_latent(codes, quantizer, 16), EXACT)


def test_lfq_code_is_sum_of_sign_bits(seed, rng):
  model = make(seed, bits=16)
  bits_Nx16 = rng.integers(0, 2, (64, 16))
  magnitude = rng.uniform(1e-3, 3.0, (64, 16))
  z = jnp.asarray((2 * bits_Nx16 - 1) * magnitude, jnp.float32).reshape(1, 8, 8, 16)
  zq, codes = call(model, quantize, z)
  expected = (bits_Nx16 << np.arange(16)).sum(-1).reshape(1, 8, 8)
  close(codes, expected, EXACT)
  close(zq, (2 * bits_Nx16 - 1).reshape(1, 8, 8, 16), EXACT)


def test_fsq_nearest_level_and_mixed_radix_round_trip(seed, rng):
  model = make(seed, quantizer='fsq', bits=8)
  z = jnp.asarray(1.5 * rng.standard_normal((2, 4, 4, 4)), jnp.float32)
  zq, codes = call(model, quantize, z)
  nearest = np.abs(np.tanh(np.asarray(z))[..., None] - FSQ_VALUES).argmin(-1)
  close(zq, FSQ_VALUES[nearest], FP32)
  close(codes, (nearest * 4 ** np.arange(4)).sum(-1), EXACT)
  # Every code: its latent, pulled slightly inside (-1, 1) and pre-tanh'd, quantizes back.
  latent = np.asarray(call(model, codebook))
  z_all = jnp.asarray(np.arctanh(0.99 * latent), jnp.float32).reshape(1, 1, 256, 4)
  _, codes_all = call(model, quantize, z_all)
  close(codes_all.reshape(-1), np.arange(256), EXACT)
  close(latent, ref_latent(np.arange(256), 'fsq', 8), EXACT)


@pytest.mark.parametrize('quantizer, bits', [('lfq', 8), ('fsq', 8), ('lfq', 16)])
def test_codebook_rows_are_distinct_latents(seed, quantizer, bits):
  model = make(seed, quantizer=quantizer, bits=bits)
  book = np.asarray(call(model, codebook))
  assert book.shape == (2 ** bits, model.latent_channels) and book.dtype == np.float32
  assert len(np.unique(book, axis=0)) == 2 ** bits
  close(book, ref_latent(np.arange(2 ** bits), quantizer, bits), EXACT)


@pytest.mark.parametrize('quantizer', ['lfq', 'fsq'])
def test_straight_through_gradient(seed, rng, quantizer):
  model = make(seed, quantizer=quantizer, bits=8)
  z = jnp.asarray(rng.standard_normal((2, 3, 3, model.latent_channels)), jnp.float32)
  w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda z_: jnp.sum(w * model.quantize(z_)[0])))(z)
  d_bounded = 1.0 if quantizer == 'lfq' else 1.0 - np.tanh(np.asarray(z)) ** 2
  close(grad, np.asarray(w) * d_bounded, FP32)


# ----------------------------------------------------------------------------- locality

def changed_positions(a, b):
  return np.argwhere(np.any(np.asarray(a) != np.asarray(b), axis=-1))


@pytest.mark.parametrize('kernel', [1, 3])
def test_locality(seed, rng, kernel):
  """kernel=1: a block's pixels reach only its code, and a code reaches only its block."""
  model = make(seed, kernel=kernel, depth=2)
  x = np.asarray(frames(rng, 1, 16, 16))
  y = x.copy()
  y[0, 4:8, 8:12] = rng.integers(0, 256, (4, 4, 3))
  changed = changed_positions(call(model, encode, jnp.asarray(x)),
                              call(model, encode, jnp.asarray(y)))
  zq = np.asarray(call(model, codes_to_latent, jnp.asarray(rng.integers(0, 256, (1, 4, 4)))))
  zq2 = zq.copy()
  zq2[0, 2, 1] = -zq2[0, 2, 1]
  pixels = changed_positions(call(model, decode, jnp.asarray(zq)),
                             call(model, decode, jnp.asarray(zq2)))
  if kernel == 1:
    close(changed, [[0, 1, 2]], EXACT)
    assert pixels.min(0).tolist() == [0, 8, 4] and pixels.max(0).tolist() == [0, 11, 7]
  else:   # the contrast: neighbours see the change, so the test above can fail
    assert len(changed) > 1
    assert pixels.min(0)[1] < 8 or pixels.max(0)[1] > 11


# ----------------------------------------------------------------------------- expected latent

@pytest.mark.parametrize('quantizer, bits', [('lfq', 8), ('fsq', 8), ('lfq', 16), ('fsq', 16)])
def test_expected_latent_is_probs_at_codebook(seed, rng, quantizer, bits):
  model = make(seed, quantizer=quantizer, bits=bits)
  vocab = 2 ** bits
  book = ref_latent(np.arange(vocab), quantizer, bits)
  logits = 3.0 * rng.standard_normal((2, 3, vocab))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  close(call(model, expected_latent, jnp.asarray(probs, jnp.float32)), probs @ book,
        dict(rtol=1e-4, atol=1e-5))
  hot = rng.integers(0, vocab, 3)
  close(call(model, expected_latent, jax.nn.one_hot(hot, vocab)), book[hot], EXACT)
  uniform = jnp.full((1, vocab), 1.0 / vocab)
  close(call(model, expected_latent, uniform), book.mean(0, keepdims=True), dict(rtol=0, atol=1e-6))


# ----------------------------------------------------------------------------- psnr and loss

def test_psnr_known_values(rng):
  a = rng.uniform(0.2, 0.8, (3, 8, 8, 3))
  sigma = np.array([0.1, 0.01, 0.03])[:, None, None, None]
  b = a + sigma * rng.choice([-1.0, 1.0], a.shape)   # mse exactly sigma**2
  close(tok.psnr(jnp.asarray(a), jnp.asarray(b)), 10 * np.log10(1 / sigma.ravel() ** 2), FP32)
  close(tok.psnr(jnp.asarray(255 * a), jnp.asarray(255 * b), max_value=255.0),
        10 * np.log10(1 / sigma.ravel() ** 2), dict(rtol=1e-4, atol=1e-4))
  same = tok.psnr(jnp.asarray(a), jnp.asarray(a))
  assert np.all(np.isfinite(same)) and np.all(np.asarray(same) >= 99.0)


@pytest.mark.parametrize('quantizer', ['lfq', 'fsq'])
def test_loss_metrics_match_reference(seed, rng, quantizer):
  c = config(quantizer=quantizer, bits=8)
  model = tok.Tokenizer(c, rngs=nnx.Rngs(seed))
  x = frames(rng, 4, 8, 8)
  total, m = call(model, loss, x)
  z = np.asarray(call(model, encode, x), np.float64)
  zq, codes = call(model, quantize, jnp.asarray(z, jnp.float32))
  image = np.asarray(call(model, decode, zq), np.float64)
  mse = np.mean((image - np.asarray(x) / 255.0) ** 2)
  close(m['recon_mse'], mse, FP32)
  close(m['psnr'], np.mean(10 * np.log10(1 / np.mean((image - np.asarray(x) / 255.0) ** 2,
                                                     axis=(1, 2, 3)))), dict(rtol=1e-4, atol=1e-4))
  bounded = z if quantizer == 'lfq' else np.tanh(z)
  commit = np.mean((bounded - np.asarray(zq)) ** 2)
  close(m['commit'], commit, dict(rtol=1e-4, atol=1e-6))
  if quantizer == 'lfq':
    p = 1 / (1 + np.exp(-4 * tok.ENTROPY_INV_TEMPERATURE * z.reshape(-1, 8)))
    entropy = ref_bernoulli_entropy(p).mean() - ref_bernoulli_entropy(p.mean(0)).mean()
  else:
    entropy = 0.0
  close(m['entropy'], entropy, dict(rtol=1e-4, atol=1e-5))
  close(total, mse * 48 + c.commit_weight * commit + c.entropy_weight * entropy,
        dict(rtol=1e-4, atol=1e-5))
  _, counts = np.unique(np.asarray(codes), return_counts=True)
  freq = counts / counts.sum()
  close(m['code_perplexity'], np.exp(-np.sum(freq * np.log(freq))), dict(rtol=1e-4, atol=0))
  assert 0.0 <= float(m['channel_usage']) <= 1.0


# ----------------------------------------------------------------------------- jit, bf16, learning

def test_bf16_params_under_jit(seed, rng):
  model = make(seed, bits=16, kernel=3)
  graphdef, state = nnx.split(model)
  state16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), state)
  x = frames(rng, 2, 16, 16)
  z32 = run(encode, graphdef, state, x)
  z16 = run(encode, graphdef, state16, x)
  assert z16.dtype == jnp.float32
  codes32, codes16 = run(tokenize, graphdef, state, x), run(tokenize, graphdef, state16, x)
  # bf16 moves latents by ~1%: only near-zero channels may flip sign.
  flipped = np.sign(np.asarray(z32)) != np.sign(np.asarray(z16))
  assert np.all(np.abs(np.asarray(z32))[flipped] < 0.1 * np.abs(np.asarray(z32)).max())
  assert np.mean(np.asarray(codes32) == np.asarray(codes16)) > 0.5
  image = run(detokenize, graphdef, state16, codes16)
  assert image.dtype == jnp.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
  grads = jax.jit(jax.grad(lambda s: run(loss, graphdef, s, x)[0]))(state16)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def smooth_textures(rng, b, size):
  """Random colours on a 4 x 4 grid, bilinearly upsampled, as uint8."""
  base = jnp.asarray(rng.uniform(0.0, 1.0, (b, 4, 4, 3)), jnp.float32)
  return jnp.round(255 * jax.image.resize(base, (b, size, size, 3), 'bilinear')).astype(jnp.uint8)


@pytest.mark.parametrize('quantizer', ['lfq', 'fsq'])
def test_it_learns_strictly_local_codes(seed, rng, quantizer):
  model = make(seed, quantizer=quantizer, bits=8, channels=32, kernel=1)
  graphdef, params = nnx.split(model)
  x = smooth_textures(rng, 16, 16)
  opt = optax.adam(3e-3)

  @jax.jit
  def steps(params, opt_state):
    def step(carry, _):
      params, opt_state = carry
      grads, metrics = jax.grad(lambda p: run(loss, graphdef, p, x), has_aux=True)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), metrics['psnr']
    return jax.lax.scan(step, (params, opt_state), length=300)

  (params, _), psnr_T = steps(params, opt.init(params))
  _, metrics = run(loss, graphdef, params, x)
  first, last = float(psnr_T[0]), float(metrics['psnr'])
  assert last > 18.0 and last > first + 6.0, (first, last)
  assert float(metrics['code_perplexity']) > 16.0, metrics   # codes did not collapse
