"""Causal language modelling (`clm`, decoders): fixed-length windows with shifted targets,
the next-token loss, bits per byte beside gzip and xz, and a few samples.

Window i of a token array is tokens[i*L : i*L + L + 1]; its inputs are the first L tokens and
its targets the last L (teacher forcing), every target counted by the loss (`loss_mask`).
Training windows are shuffled anew every epoch by grain, sliced per host, and batched; the grain
iterator's state goes into each checkpoint, so a resumed run continues with exactly the batches
it would have seen. With data.fim_rate, each training window's documents are rearranged for
fill-in-the-middle (lm.data.fim); evaluation windows stay left to right.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from lm import objectives, parallel, sampling
from lm.data import fim, store
from lm.errors import require
from lm.tasks.base import (DataConfig, Task, batched, compressed_bits_per_byte, shuffled_indices, spread,
                           stacked)

SAMPLE_PROMPTS = ('import ', 'def ', 'class ')
KEYS = ('inputs', 'targets', 'loss_mask')


def num_windows(num_tokens: int, seq_len: int) -> int:
  return (num_tokens - 1) // seq_len


def window(tokens: np.ndarray, index: int, seq_len: int) -> dict[str, np.ndarray]:
  chunk = np.asarray(tokens[index * seq_len: index * seq_len + seq_len + 1], np.int32)
  return {'inputs': chunk[:-1], 'targets': chunk[1:], 'loss_mask': np.ones(seq_len, bool)}


def strided_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
  """(first input token, first scored target) of windows of seq_len that score each target the
  plain evaluation scores (tokens 1 .. num_windows x seq_len) once: the first window all of
  its targets, each next one `stride` tokens on (the last one flush with the end) those not
  scored yet, each with at least seq_len - stride tokens before it."""
  covered = num_windows(num_tokens, seq_len) * seq_len
  out, scored = [], 0  # targets 1 .. scored are done
  while scored < covered:
    start = min(scored + stride - seq_len, covered - seq_len) if scored else 0
    out.append((start, scored + 1))
    scored = start + seq_len
  return out


def strided_eval_batches(tokens: np.ndarray, *, seq_len: int, stride: int, batch_size: int,
                         pad_id: int) -> list[dict[str, np.ndarray]]:
  """The windows of strided_windows in batches, each masked to the targets it scores."""
  windows = []
  for start, first in strided_windows(len(tokens), seq_len, stride):
    chunk = np.asarray(tokens[start:start + seq_len + 1], np.int32)
    windows.append({'inputs': chunk[:-1], 'targets': chunk[1:],
                    'loss_mask': np.arange(start + 1, start + seq_len + 1) >= first})
  return stacked(windows, batch_size, filler(seq_len, pad_id))


def fim_window(example: dict[str, np.ndarray], rng: np.random.Generator, tokenizer,
               fim_rate: float, spm_rate: float, unit: str = 'char') -> dict[str, np.ndarray]:
  """A window with its document fragments rearranged for fill-in-the-middle (lm.data.fim)."""
  chunk_R = np.concatenate([example['inputs'], example['targets'][-1:]])
  chunk_R, valid_R = fim.transform(chunk_R, rng, tokenizer, fim_rate, spm_rate, unit)
  return {'inputs': chunk_R[:-1], 'targets': chunk_R[1:], 'loss_mask': valid_R[1:]}


def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, tokenizer=None,
                  fim_rate: float = 0.0, fim_spm_rate: float = 0.5,
                  fim_unit: str = 'char') -> grain.IterDataset:
  """Endless shuffled batches of this host's share (batch_size is the global batch); with
  fim_rate, fill-in-the-middle drawn afresh for each window of each epoch."""
  ds = shuffled_indices(num_windows(len(tokens), seq_len), seed)
  ds = ds.map(lambda i: window(tokens, i, seq_len))
  if fim_rate:
    ds = ds.random_map(functools.partial(fim_window, tokenizer=tokenizer, fim_rate=fim_rate,
                                         spm_rate=fim_spm_rate, unit=fim_unit),
                       seed=seed)
  return batched(ds, batch_size, process_index, process_count)


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, pad_id: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """Non-overlapping windows in order, or `max_batches` worth spread evenly over the split.

  The last batch is filled with windows of `pad_id` whose `loss_mask` is all False.
  """
  indices = spread(num_windows(len(tokens), seq_len), batch_size, max_batches)
  return stacked([window(tokens, int(i), seq_len) for i in indices], batch_size,
                 filler(seq_len, pad_id))


def filler(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A window of padding that no loss reads: what fills an evaluation's last batch."""
  return {'inputs': np.full(seq_len, pad_id, np.int32),
          'targets': np.full(seq_len, pad_id, np.int32), 'loss_mask': np.zeros(seq_len, bool)}


@dataclasses.dataclass(frozen=True)
class CausalData(DataConfig):
  """clm's data keys: the common ones and fill-in-the-middle's."""
  fim_rate: float = 0.0  # share of documents laid out for fill-in-the-middle (lm.data.fim)
  fim_spm_rate: float = 0.5  # share of those laid out SPM (suffix first) rather than PSM
  fim_unit: str = 'char'  # where a middle is cut: at any two characters, or two line starts


class CausalLM(Task):
  name = 'clm'
  layout = 'documents'
  data_config = CausalData

  @staticmethod
  def validate(data: CausalData) -> None:
    for key in ('fim_rate', 'fim_spm_rate'):
      require(0.0 <= getattr(data, key) <= 1.0, f'data.{key}', getattr(data, key),
              'a probability: give a number in [0, 1] (fim_rate 0 turns fill-in-the-middle off)')
    require(data.fim_unit in fim.UNITS, 'data.fim_unit', data.fim_unit,
            f'use one of {fim.UNITS}: cuts at any two characters, or at two line starts')

  def __init__(self, *args):
    super().__init__(*args)
    tok = self.tokenizer
    self.loss_fn = functools.partial(objectives.clm_loss, apply_fn=self.model.apply)
    self.eval_fn = functools.partial(objectives.clm_eval_sums, apply_fn=self.model.apply,
                                     token_bytes_V=jnp.asarray(tok.token_bytes()))

  def batch_shapes(self):
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    return {'inputs': jax.ShapeDtypeStruct(shape, jnp.int32),
            'targets': jax.ShapeDtypeStruct(shape, jnp.int32),
            'loss_mask': jax.ShapeDtypeStruct(shape, jnp.bool_)}

  def train_dataset(self, process_index, process_count):
    t = self.cfg.train
    d = self.cfg.data
    return train_dataset(self.splits['train'].tokens, seq_len=d.seq_len,
                         batch_size=t.batch_size, seed=t.seed, process_index=process_index,
                         process_count=process_count, tokenizer=self.tokenizer,
                         fim_rate=d.fim_rate, fim_spm_rate=d.fim_spm_rate,
                         fim_unit=d.fim_unit)

  def eval_batches(self, max_batches):
    return eval_batches(self.splits['val'].tokens, seq_len=self.cfg.data.seq_len,
                        batch_size=self.cfg.train.batch_size, pad_id=self.tokenizer.pad_id,
                        max_batches=max_batches)

  def final_evals(self):
    if not 0 < self.cfg.eval.stride < self.cfg.data.seq_len:  # else the plain windows again
      return {}
    return {'strided': strided_eval_batches(
        self.splits['val'].tokens, seq_len=self.cfg.data.seq_len, stride=self.cfg.eval.stride,
        batch_size=self.cfg.train.batch_size, pad_id=self.tokenizer.pad_id)}

  def metrics(self, sums):
    return objectives.clm_eval_metrics(sums)

  def references(self) -> tuple[int, dict[str, float]]:
    """(bytes, {compressor: bits per byte}) of the held-out text the evaluation scores: gzip -9,
    xz -9, and xz -9e given the training text; computed once per token store and seq_len, and
    kept in the store's directory."""
    seq_len, val_tokens = self.cfg.data.seq_len, self.splits['val'].tokens
    covered = num_windows(len(val_tokens), seq_len) * seq_len
    decode = lambda tokens: self.tokenizer.decode(np.asarray(tokens).tolist()).encode('utf-8')
    def compute():  # decoding and compressing only when the store has no copy yet
      text = decode(val_tokens[1:covered + 1])
      return {'bytes': len(text), **compressed_bits_per_byte(
          text, context=decode(self.splits['train'].tokens))}
    out = store.cached_json(store.directory_of(self.cfg.data, self.tokenizer, self.layout),
                            f'references-T{seq_len}.json', compute)
    return out.pop('bytes'), out

  def report(self, params, val, mesh, base=None):
    num_bytes, baselines = self.references()
    lines = [f'({num_bytes:,} bytes of held-out text):']
    extra = {'gzip_bpb': baselines['gzip -9'], 'xz_bpb': baselines['xz -9'],
             'xz_given_train_bpb': baselines['xz -9e given train']}
    if base is not None:  # train.init_from: the starting model
      extra.update(base_loss=base[1]['loss'], base_bpb=base[1]['bpb'])
      lines.append(f'  {"start":<18} loss {base[1]["loss"]:.4f} nats/token   '
                   f'{base[1]["bpb"]:.4f} bits/byte')
    lines.append(f'  {"model":<18} loss {val["loss"]:.4f} nats/token   {val["bpb"]:.4f} bits/byte')
    if 'strided_bpb' in val:
      context = self.cfg.data.seq_len - self.cfg.eval.stride
      lines.append(f'  {"model, strided":<18} loss {val["strided_loss"]:.4f} nats/token   '
                   f'{val["strided_bpb"]:.4f} bits/byte   (windows every {self.cfg.eval.stride} '
                   f'tokens: each token after {context} or more)')
    lines += [f'  {name:<18} {"":27} {bpb:.4f} bits/byte' for name, bpb in baselines.items()]
    for i, sample in enumerate(self.samples(params, mesh)):
      lines.append(f'\n--- sample {i + 1} ---\n{sample}')
    return extra, lines

  def samples(self, params, mesh) -> list[str]:
    t, tok = self.cfg.train, self.tokenizer
    if not t.num_samples or not t.sample_len:
      return []
    prompts = [[tok.bos_id, *tok.encode(SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)])]
               for i in range(t.num_samples)]
    in_vocabulary = lambda logits_BxV: jnp.where(  # init_from: the model's V may be larger
        jnp.arange(logits_BxV.shape[-1]) < tok.vocab_size, logits_BxV, -jnp.inf)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
      out = sampling.generate(
          self.cfg.model, params, prompts, rng=jax.random.PRNGKey(t.seed),
          max_new_tokens=min(t.sample_len, self.cfg.model.max_len - max(map(len, prompts))),
          filter_fn=sampling.chain(in_vocabulary, sampling.temperature(0.8)),
          eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [tok.decode(p[1:] + ids) for p, ids in zip(prompts, out.tokens)]
