"""Synthetic reverse-the-sequence examples through a Grain pipeline.

Example i is a pure function of (seed, i) — a counter-based hash, no RNG
state — so any process can make any example, a batch is the same whichever
processes share it, and an iterator's state is just its position.
"""

import grain
import numpy as np

from brainscale.data import batches

BOS, SEP = 0, 1   # tokens 2..vocab-1 are content


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A well-mixed 64-bit hash of each entry (uint64 arithmetic wraps)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def examples(indices_B: np.ndarray, *, seed: int, length: int, vocab: int) -> dict:
  """Examples [BOS, a_1..a_L, SEP, a_L..a_1] for the given indices; loss on the reversed half."""
  indices_B = np.asarray(indices_B, np.uint64)
  counter_BxL = indices_B[:, None] * np.uint64(length) + np.arange(length, dtype=np.uint64)
  key_BxL = _splitmix64(counter_BxL ^ (np.uint64(seed) << np.uint64(44)))
  a_BxL = (key_BxL % np.uint64(vocab - 2) + np.uint64(2)).astype(np.int32)
  b = len(indices_B)
  seq_BxS = np.concatenate([np.full((b, 1), BOS, np.int32), a_BxL,
                            np.full((b, 1), SEP, np.int32), a_BxL[:, ::-1]], axis=1)
  mask_BxT = np.zeros((b, seq_BxS.shape[1] - 1), np.float32)
  mask_BxT[:, length + 1:] = 1.0   # the targets after SEP: the reversed tokens
  return {'inputs': seq_BxS[:, :-1], 'targets': seq_BxS[:, 1:], 'mask': mask_BxT}


def pipeline(*, seed: int, length: int, vocab: int, batch_size: int, process_index: int,
             process_count: int, workers: int, prefetch: int) -> grain.IterDataset:
  """Batches of this process, forever: process p takes examples p, p + P, p + 2P, ..."""
  batches.check_split(batch_size, process_count)
  make = lambda indices: examples(indices, seed=seed, length=length, vocab=vocab)
  ds = grain.MapDataset.range(1 << 40)[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True).map(make)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  return batches.in_workers(it, workers)
