"""Synthetic reverse-the-sequence examples through a Grain pipeline.

Example i is drawn from a generator seeded by (seed, i), so any process can
make any example, and an iterator's state is just its position.
"""

import grain
import numpy as np

BOS, SEP = 0, 1   # tokens 2..vocab-1 are content


def example(index: int, *, seed: int, length: int, vocab: int) -> dict:
  """[BOS, a_1..a_L, SEP, a_L..a_1]; the loss covers the reversed half."""
  rng = np.random.default_rng([seed, index])
  a_L = rng.integers(2, vocab, length, dtype=np.int32)
  seq = np.concatenate([[BOS], a_L, [SEP], a_L[::-1]]).astype(np.int32)
  mask = np.zeros(len(seq) - 1, np.float32)
  mask[length:] = 1.0   # targets SEP+1.. are the reversed tokens
  return {'inputs': seq[:-1], 'targets': seq[1:], 'mask': mask}


def pipeline(*, seed: int, length: int, vocab: int, batch_size: int, process_index: int,
             process_count: int, workers: int, prefetch: int) -> grain.IterDataset:
  """Batches of this process, forever."""
  if batch_size % process_count:
    raise ValueError(f'train.batch_size={batch_size} does not split over {process_count} processes')
  make = lambda i: example(i, seed=seed, length=length, vocab=vocab)
  ds = grain.MapDataset.range(1 << 40)[process_index::process_count].map(make)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it
