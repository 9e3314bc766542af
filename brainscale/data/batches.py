"""The Grain plumbing the pipelines share: shuffle per epoch, split over processes, batch, prefetch.

Example i is made by `make(local_index, item)` from item i of a list of `count`;
local_index * process_count + process_index is its global position, so an
example depends only on (seed, position), never on the number of workers.
"""

import signal

import grain


def check_split(batch_size: int, process_count: int) -> None:
  if batch_size % process_count or batch_size < process_count:
    raise ValueError(f'batch_size={batch_size} does not split over '
                     f'{process_count} processes')


def batched(make, count: int, *, seed: int, batch_size: int, process_index: int,
            process_count: int, train: bool, num_epochs: int | None, prefetch: int,
            workers: int) -> grain.IterDataset:
  """This process's batches (batch_size // process_count examples) of items 0..count-1."""
  check_split(batch_size, process_count)
  ds = grain.MapDataset.range(count)
  if train:
    ds = ds.seed(seed).shuffle()   # reshuffled every epoch by the repeat below
  ds = ds.repeat(num_epochs)[process_index::process_count]
  ds = ds.map_with_index(make).batch(batch_size // process_count, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  return in_workers(it, workers)


def _ignore_sigterm(worker_index: int, worker_count: int):
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def in_workers(it: grain.IterDataset, workers: int) -> grain.IterDataset:
  """`it` produced by `workers` Grain processes (0: in this process).

  The workers ignore SIGTERM: SLURM signals every process of a job step, and the
  trainer still draws batches until all processes reach the step they agreed to
  checkpoint at (brainscale.train.preemption); Grain stops its workers itself.
  """
  if workers <= 0:
    return it
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_ignore_sigterm)
