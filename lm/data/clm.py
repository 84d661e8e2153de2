"""Causal language modelling pipeline: fixed-length windows with shifted targets.

Window i of a token array is tokens[i*L : i*L + L + 1]; its inputs are the first L tokens and
its targets the last L (teacher forcing). Training windows are shuffled anew every epoch by
grain, sliced per host, and batched; the grain iterator's state goes into each checkpoint, so
a resumed run continues with exactly the batches it would have seen.
"""
from __future__ import annotations

import grain
import numpy as np


def num_windows(num_tokens: int, seq_len: int) -> int:
  return (num_tokens - 1) // seq_len


def window(tokens: np.ndarray, index: int, seq_len: int) -> dict[str, np.ndarray]:
  chunk = np.asarray(tokens[index * seq_len: index * seq_len + seq_len + 1], np.int32)
  return {'inputs': chunk[:-1], 'targets': chunk[1:]}


def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless shuffled batches of this host's share (batch_size is the global batch)."""
  ds = (grain.MapDataset.range(num_windows(len(tokens), seq_len))
        .shuffle(seed=seed)
        .repeat()[process_index::process_count]
        .map(lambda i: window(tokens, i, seq_len))
        .batch(batch_size // process_count, drop_remainder=True))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, pad_id: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """Non-overlapping windows in order, or `max_batches` worth spread evenly over the split.

  The last batch is filled with windows whose targets are all `pad_id`, which losses ignore.
  """
  count = num_windows(len(tokens), seq_len)
  if max_batches is not None and max_batches * batch_size < count:
    indices = np.linspace(0, count - 1, max_batches * batch_size).round().astype(int)
  else:
    indices = np.arange(count)
  windows = [window(tokens, int(i), seq_len) for i in indices]
  padding = -len(windows) % batch_size
  windows += [{'inputs': np.full(seq_len, pad_id, np.int32),
               'targets': np.full(seq_len, pad_id, np.int32)}] * padding
  return [{k: np.stack([w[k] for w in windows[i:i + batch_size]]) for k in ('inputs', 'targets')}
          for i in range(0, len(windows), batch_size)]
