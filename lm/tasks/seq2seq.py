"""Sequence to sequence (`seq2seq`, encoder-decoders): pairs of an input text and a target text,
the loss on the target tokens, the per-token accuracy beside the most-frequent-token baseline.

Data: JSONL files (data.paths) of one {"input": ..., "target": ...} object a line; a line
without them is an error naming the file and line. Without data.paths, the default pairs are
the Python stdlib's documented public functions: the docstring's summary as the input, the
signature as the target. A pair goes to train or validation by the stable hash of its line (its
function's name, by default), as lm.data.corpus splits documents.

A row: the input's tokens then EOS in data.seq_len columns (`input_mask` True on them), and the
target's tokens then EOS in data.target_len columns (`loss_mask` True on them), the rest
padding; a longer input or target keeps its first tokens and EOS, and the cut ones are counted
and said when the run starts. The decoder reads the target shifted right behind
model.decoder_start_id. Rows are shuffled anew every epoch by grain (its iterator's state in
every checkpoint). The span task (lm.tasks.span) shares this loss, evaluation and report.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import objectives, parallel, sampling
from lm.errors import ConfigError, require
from lm.models import TokenCounts
from lm.data import conversations, corpus
from lm.tasks.base import DataConfig, Task, batched, shuffled_indices, spread, stacked

if TYPE_CHECKING:
  from lm.config import Config

KEYS = ('inputs', 'input_mask', 'targets', 'loss_mask')


@dataclasses.dataclass(frozen=True)
class Pairs:
  """One split's pairs as rows: inputs_NxS, input_mask_NxS, targets_NxT, loss_mask_NxT."""
  rows: dict[str, np.ndarray]
  texts: list[tuple[str, str]]  # (input, target) of each row
  num_cut: int  # pairs whose input or target was cut to fit


def read_pairs(paths, val_fraction: float):
  """('train' or 'val', input, target) of every pair: data.paths' JSONL files, or the default
  pairs (see the module docstring)."""
  if not paths:
    for source in corpus.stdlib_files():
      module = source.key[:-len('.py')].replace('/', '.').removesuffix('.__init__')
      for name, signature, summary, _ in conversations.functions(source):
        split = 'val' if corpus.is_validation(f'{module}.{name}', val_fraction) else 'train'
        yield split, summary, f'def {signature}'
    return
  for source in corpus.glob_files(paths):
    text = source.path.read_text(encoding='utf-8', errors='replace')
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        pair = [corpus.json_field(line, key, str) for key in ('input', 'target')]
      except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f'{source.path}:{number}: a seq2seq line is one JSON object with "input" and '
            f'"target" strings ({type(e).__name__}: {e}); fix or remove the line') from e
      yield ('val' if corpus.is_validation(line.strip(), val_fraction) else 'train'), *pair


def encode_row(tokenizer, ids: list[int], length: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """(tokens then EOS, padded to `length`; their mask; whether it was cut)."""
  cut = len(ids) + 1 > length
  ids = [*ids[:length - 1], tokenizer.eos_id]
  row = np.full(length, tokenizer.pad_id, np.int32)
  row[:len(ids)] = ids
  return row, np.arange(length) < len(ids), cut


def load(cfg: Config, tokenizer) -> dict[str, Pairs]:
  texts = {'train': [], 'val': []}
  for split, source, target in read_pairs(cfg.data.paths, cfg.data.val_fraction):
    texts[split].append((source, target))
  out = {}
  for split, pairs in texts.items():
    where = ', '.join(cfg.data.paths) or 'the default pairs (Python stdlib docstrings)'
    if not pairs:
      raise ConfigError(f'data.paths={where!r}: the {split} split holds no pair; give more '
                        'lines (or change data.val_fraction)')
    ids = zip(tokenizer.encode_batch([s for s, _ in pairs]),
              tokenizer.encode_batch([t for _, t in pairs]))
    rows, cut = [], 0
    for source_ids, target_ids in ids:
      inputs, input_mask, cut_input = encode_row(tokenizer, source_ids, cfg.data.seq_len)
      targets, loss_mask, cut_target = encode_row(tokenizer, target_ids, cfg.data.target_len)
      rows.append({'inputs': inputs, 'input_mask': input_mask, 'targets': targets,
                   'loss_mask': loss_mask})
      cut += cut_input or cut_target
    out[split] = Pairs({k: np.stack([r[k] for r in rows]) for k in KEYS}, pairs, cut)
  return out


def most_frequent_target(rows: dict[str, np.ndarray]) -> int:
  """The commonest target token (where the loss counts): the accuracy baseline."""
  return int(np.argmax(np.bincount(rows['targets'][rows['loss_mask']])))


@dataclasses.dataclass(frozen=True)
class PairsData(DataConfig):
  """seq2seq's data keys: the common ones (data.seq_len: the input's tokens) and the target's."""
  target_len: int = 64  # target tokens a row, EOS included


class Seq2Seq(Task):
  """The seq2seq task; also the base of span corruption, which sets `val_rows` (every
  validation row, ready for the loss) and `train_dataset` its own way."""
  name = 'seq2seq'
  data_config = PairsData

  @staticmethod
  def validate(data: PairsData) -> None:
    require(data.target_len > 0, 'data.target_len', data.target_len, 'must be positive')

  @staticmethod
  def token_counts(data: PairsData) -> TokenCounts:
    """seq_len input tokens and target_len target tokens a row."""
    return TokenCounts(data.seq_len, target_len=data.target_len)

  @classmethod
  def load(cls, cfg: Config, tokenizer) -> dict[str, Pairs]:
    splits = load(cfg, tokenizer)
    for name, p in splits.items():
      print(f'seq2seq {name}: {len(p.texts)} pairs; {p.num_cut} cut to data.seq_len='
            f'{cfg.data.seq_len} input or data.target_len={cfg.data.target_len} target tokens')
    return splits

  def __init__(self, *args):
    super().__init__(*args)
    self.val_rows = self.validation_rows()
    self.mode_id = most_frequent_target(self.val_rows)
    common = dict(apply_fn=self.model.apply, start_id=self.cfg.model.decoder_start_id)
    self.loss_fn = functools.partial(objectives.seq2seq_loss, **common)
    self.eval_fn = functools.partial(objectives.seq2seq_eval_sums, **common,
                                     token_bytes_V=jnp.asarray(self.tokenizer.token_bytes()),
                                     mode_id=self.mode_id)

  def validation_rows(self) -> dict[str, np.ndarray]:
    return self.splits['val'].rows

  @property
  def target_len(self) -> int:
    return self.cfg.data.target_len


  def batch_shapes(self):
    b, s, t = self.cfg.train.batch_size, self.cfg.data.seq_len, self.target_len
    return {k: jax.ShapeDtypeStruct((b, s if k.startswith('input') else t),
                                    jnp.bool_ if k.endswith('mask') else jnp.int32)
            for k in KEYS}

  def train_dataset(self, process_index, process_count):
    t, rows = self.cfg.train, self.splits['train'].rows
    ds = shuffled_indices(len(rows['inputs']), t.seed)
    return batched(ds.map(lambda i: {k: v[i] for k, v in rows.items()}), t.batch_size,
                   process_index, process_count)

  def eval_batches(self, max_batches):
    rows, batch_size = self.val_rows, self.cfg.train.batch_size
    picked = [{k: v[int(i)] for k, v in rows.items()}
              for i in spread(len(rows['inputs']), batch_size, max_batches)]
    filler = {k: np.zeros_like(v) for k, v in picked[0].items()}  # masks False: no loss
    return stacked(picked, batch_size, filler)

  def metrics(self, sums):
    return objectives.seq2seq_metrics(sums)

  def generate(self, params, mesh, rows: dict[str, np.ndarray]) -> list[list[int]]:
    """Greedy outputs for the encoder inputs of `rows`, up to EOS or the target length."""
    tok = self.tokenizer
    prompts = [r[m].tolist() for r, m in zip(rows['inputs'], rows['input_mask'])]
    in_vocabulary = lambda logits_BxV: jnp.where(
        jnp.arange(logits_BxV.shape[-1]) < tok.vocab_size, logits_BxV, -jnp.inf)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
      return sampling.generate(self.cfg.model, params, prompts, max_new_tokens=self.target_len,
                               filter_fn=in_vocabulary, eos_id=tok.eos_id,
                               pad_id=tok.pad_id).tokens

  def show(self, ids) -> str:
    """Text with each sentinel written as <|extra_id_i|> and EOS as <|eos|>."""
    shown = {i: f'<|extra_id_{n}|>' for n, i in enumerate(self.tokenizer.sentinel_ids)}
    shown[self.tokenizer.eos_id] = '<|eos|>'
    out, run = [], []
    for i in [int(i) for i in ids] + [None]:
      if i is None or i in shown:
        out.append(self.tokenizer.decode(run))
        run = []
        if i is not None:
          out.append(shown[i])
      else:
        run.append(i)
    return ''.join(out)

  def report_lines(self, val: dict[str, float]) -> list[str]:
    mode = self.show([self.mode_id])
    return [f'({int(self.val_rows["loss_mask"].sum()):,} held-out target tokens):',
            f'  target loss {val["loss"]:.4f} nats/token   {val["bpb"]:.4f} bits/byte',
            f'  accuracy    {val["accuracy"]:.4f}   (always the most frequent target token '
            f'{mode!r}: {val["mode_accuracy"]:.4f})']

  def report(self, params, val, mesh, base=None):
    lines = self.report_lines(val)
    if not self.cfg.train.num_samples:
      return {}, lines
    shown = {k: v[:self.cfg.train.num_samples] for k, v in self.val_rows.items()}
    outputs = self.generate(params, mesh, shown)
    for i, out in enumerate(outputs):
      mask = shown['input_mask'][i]
      lines += [f'\n--- example {i + 1} ---',
                f'input:  {self.show(shown["inputs"][i][mask])}',
                f'target: {self.show(shown["targets"][i][shown["loss_mask"][i]])}',
                f'model:  {self.show(out)}']
    return {}, lines
