"""Task seam for the smoke family."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from brainscale import config as config_lib
from brainscale import nn
from brainscale.smoke import data
from brainscale.smoke.model import Spec, TinyLM
from brainscale.train import task


class Task(task.Task, task.Costs):

  def model(self, rngs: nnx.Rngs) -> TinyLM:
    return TinyLM(config_lib.typed(Spec, self.config.model), rngs=rngs)

  def _pipeline(self, seed, process_index, process_count):
    c = self.config
    return data.pipeline(seed=seed, length=c.data.length, vocab=c.model.vocab,
                         batch_size=c.train.batch_size, process_index=process_index,
                         process_count=process_count, workers=c.data.workers,
                         prefetch=c.data.prefetch)

  def train_data(self, process_index, process_count):
    return iter(self._pipeline(self.config.seed, process_index, process_count))

  def eval_data(self, process_index, process_count):
    it = iter(self._pipeline(self.config.seed + 1_000_003, process_index, process_count))
    return [next(it) for _ in range(self.config.train.eval_batches)]

  def batch_shapes(self, batch_size):
    t = self.tokens_per_example()
    return {'inputs': jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
            'targets': jax.ShapeDtypeStruct((batch_size, t), jnp.int32),
            'mask': jax.ShapeDtypeStruct((batch_size, t), jnp.float32)}

  def synthetic_batch(self, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    t, vocab = self.tokens_per_example(), self.config.model.vocab
    return {'inputs': rng.integers(0, vocab, (batch_size, t), dtype=np.int32),
            'targets': rng.integers(0, vocab, (batch_size, t), dtype=np.int32),
            'mask': np.ones((batch_size, t), np.float32)}

  def tokens_per_example(self):
    return 2 * self.config.data.length + 1

  def loss(self, model, batch, rng, train):
    del rng
    x_BxTxD = model.features(batch['inputs'])
    nll_BxT = nn.chunked_cross_entropy(x_BxTxD, model.head.w_DxV[...], batch['targets'],
                                       chunk=self.config.model.loss_chunk)
    loss = nn.masked_mean(nll_BxT, batch['mask'])
    metrics = {'loss': loss}
    if not train:  # full logits only at eval, where the batch is small
      correct_BxT = jnp.argmax(model.head(x_BxTxD), -1) == batch['targets']
      metrics['accuracy'] = nn.masked_mean(correct_BxT, batch['mask'])
    return loss, metrics

  def flops_per_example(self) -> float:
    m, t = self.config.model, 2 * self.config.data.length + 1
    attn = m.dim * m.heads * m.head_dim * 2 + m.dim * m.kv_heads * m.head_dim * 2
    mlp = m.dim * m.mlp_hidden * (3 if m.mlp == 'swiglu' else 2)
    matmul_params = m.layers * (attn + mlp) + m.dim * m.vocab
    causal_attention = 6 * m.layers * t * t * m.heads * m.head_dim  # half of 12 L T^2 d
    return 6 * matmul_params * t + causal_attention

  def activation_bytes(self, examples_per_device: int) -> int:
    m, t = self.config.model, 2 * self.config.data.length + 1
    return nn.stack_activation_bytes(
        layers=m.layers, tokens=examples_per_device * t, dim=m.dim, mlp_hidden=m.mlp_hidden,
        heads=m.heads, seq=t, remat=m.remat, dense_scores=m.attention == 'xla')
