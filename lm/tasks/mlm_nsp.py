"""Masked LM + next-sentence prediction (`mlm_nsp`, encoders): sentence pairs
[CLS] A [SEP] B [SEP], BERT's losses, accuracies beside the baselines of the most frequent
token and of chance.

A document is a file of the corpus, a sentence one of its lines (corpus.lines: a non-blank
line and the blank lines after it), tokenized alone in the store's `lines` layout; A and B are
runs of lines. (With runs of non-blank lines, paragraphs, as the sentences, the default run's
NSP accuracy stalled at 0.62: on source code, where a block begins says little about the block
before it.) Example i starts at anchor line i: a line with at least one more in its document.
A is the anchor and the lines after it while A holds less than half the budget (seq_len - 3
tokens), always leaving one line of the document; then, with probability 1/2, B is what
follows A in its document (label IS_NEXT = 0, as Hugging Face's BERT), otherwise lines from a
random line of another document (label RANDOM = 1); B takes lines while the pair holds less
than the budget. A pair over the budget is trimmed at its outer ends, A from its front and B
from its back, so the junction where A meets B, which the label is about, is kept; the longer
side is trimmed first.

Which tokens are masked is not decided here: the loss draws fresh masks every step
(objectives.mask_tokens). Training examples are shuffled anew every epoch and drawn with a
generator seeded by their position in the stream, so the grain iterator's state in a
checkpoint resumes exactly the same pairs.
"""
from __future__ import annotations

import dataclasses
import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lm import objectives
from lm.errors import ConfigError, require
from lm.models import TokenCounts
from lm.data.store import Split
from lm.encoding import fill_mask
from lm.tasks.base import DataConfig, Task, batched, shuffled_indices, spread, stacked

FILL_EXAMPLES = ('for i in ra[MASK]ge(n):', 'def __init__(se[MASK]f):', 'import o[MASK]')
IS_NEXT, RANDOM = 0, 1
NO_LABEL = -1  # the padding rows that fill a last evaluation batch


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  cls: int
  sep: int
  pad: int


def check_split(split: Split, name: str, paths: object) -> None:
  """A split needs two documents (a random B comes from another one) and a document of two
  lines (an A followed by its B)."""
  docs = len(split.document_starts) - 1
  if docs < 2:
    raise ConfigError(
        f'data.paths={paths!r}: the {name} split holds {docs} document(s); next-sentence '
        'prediction draws a random B from another document, so no negative pair is possible: '
        'give a corpus of more documents (text files split whole, JSONL files by line; for '
        'val, raise data.val_fraction)')
  if not len(anchors(split)):
    raise ConfigError(
        f'data.paths={paths!r}: no document of the {name} split holds two non-blank lines, so '
        'no pair A, B where B follows A exists')


def anchors(split: Split) -> np.ndarray:
  """The lines that have a next line in their document."""
  docs = split.document_starts
  last_S = np.zeros(docs[-1], bool)
  last_S[docs[1:][docs[1:] > docs[:-1]] - 1] = True  # the last line of each document
  return np.flatnonzero(~last_S)


def trim(length_a: int, length_b: int, budget: int) -> tuple[int, int]:
  """Lengths that fit `budget`, cut from the longer side first; each keeps >= 1 if budget >= 2."""
  keep_b = min(length_b, max(budget - length_a, budget // 2))
  return min(length_a, budget - keep_b), keep_b


def make_pair(split: Split, anchor: int, rng: np.random.Generator,
              budget: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(A tokens, B tokens, label) of the example at line `anchor`; len(A) + len(B) <= budget."""
  starts, docs = split.line_starts, split.document_starts
  length = lambda first, end: int(starts[end] - starts[first])  # tokens of lines [first, end)
  doc = int(np.searchsorted(docs, anchor, side='right')) - 1
  doc_end = int(docs[doc + 1])
  a_end = anchor + 1
  while a_end < doc_end - 1 and length(anchor, a_end) < budget // 2:
    a_end += 1
  label = IS_NEXT if rng.random() < 0.5 else RANDOM
  if label == IS_NEXT:
    b_start, b_limit = a_end, doc_end
  else:
    other = int(rng.integers(len(docs) - 2))
    other += other >= doc
    b_start = int(rng.integers(docs[other], docs[other + 1]))
    b_limit = int(docs[other + 1])
  b_end = b_start + 1
  while b_end < b_limit and length(anchor, a_end) + length(b_start, b_end) < budget:
    b_end += 1
  keep_a, keep_b = trim(length(anchor, a_end), length(b_start, b_end), budget)
  a = split.tokens[starts[a_end] - keep_a:starts[a_end]]
  b = split.tokens[starts[b_start]:starts[b_start] + keep_b]
  return np.asarray(a, np.int32), np.asarray(b, np.int32), label


def encode_pair(a: np.ndarray, b: np.ndarray, label: int, seq_len: int,
                ids: SpecialIds) -> dict[str, np.ndarray]:
  """tokens [CLS] A [SEP] B [SEP] then padding; segment 0 up to the first [SEP], 1 after."""
  used = len(a) + len(b) + 3
  tokens = np.full(seq_len, ids.pad, np.int32)
  tokens[:used] = np.concatenate([[ids.cls], a, [ids.sep], b, [ids.sep]])
  segments = np.zeros(seq_len, np.int32)
  segments[len(a) + 2:used] = 1
  return {'tokens': tokens, 'segment_ids': segments, 'nsp_labels': np.int32(label)}


def example(split: Split, anchor: int, rng: np.random.Generator, seq_len: int,
            ids: SpecialIds) -> dict[str, np.ndarray]:
  return encode_pair(*make_pair(split, anchor, rng, seq_len - 3), seq_len, ids)


def train_dataset(split: Split, *, seq_len: int, batch_size: int, seed: int, ids: SpecialIds,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless shuffled batches of this host's share (batch_size is the global batch)."""
  starts = anchors(split)
  ds = shuffled_indices(len(starts), seed).random_map(
      lambda i, rng: example(split, int(starts[i]), rng, seq_len, ids), seed=seed)
  return batched(ds, batch_size, process_index, process_count)


def eval_batches(split: Split, *, seq_len: int, batch_size: int, ids: SpecialIds, seed: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The same pairs every time: anchors spread evenly over the split (all of them, or
  `max_batches` worth), example j drawn with a generator seeded by (seed, j). The last batch is
  filled with rows of padding labelled NO_LABEL, which the metrics leave out."""
  starts = anchors(split)
  starts = starts[spread(len(starts), batch_size, max_batches)]
  rows = [example(split, int(s), np.random.default_rng([seed, j]), seq_len, ids)
          for j, s in enumerate(starts)]
  filler = {'tokens': np.full(seq_len, ids.pad, np.int32),
            'segment_ids': np.zeros(seq_len, np.int32), 'nsp_labels': np.int32(NO_LABEL)}
  return stacked(rows, batch_size, filler)


def most_frequent_token(split: Split) -> int:
  """The commonest token: predicting it at every masked position is the baseline accuracy."""
  return int(np.argmax(np.bincount(np.asarray(split.tokens))))


@dataclasses.dataclass(frozen=True)
class MaskedData(DataConfig):
  """mlm_nsp's data keys: the common ones and the share of tokens chosen for prediction."""
  mask_rate: float = 0.15  # share of a sequence's tokens chosen for prediction


class MaskedLM(Task):
  name = 'mlm_nsp'
  layout = 'lines'
  data_config = MaskedData

  @staticmethod
  def validate(data: MaskedData) -> None:
    require(0.0 < data.mask_rate < 1.0, 'data.mask_rate', data.mask_rate,
            'the share of tokens chosen for prediction must be in (0, 1), e.g. 0.15')
    require(data.seq_len >= 5, 'data.seq_len', data.seq_len,
            '[CLS] A [SEP] B [SEP] needs at least 5 tokens (one each for A and B); '
            'give data.seq_len >= 5, e.g. 128')

  @staticmethod
  def token_counts(data: MaskedData) -> TokenCounts:
    """The vocabulary projection runs on the masked share of the tokens."""
    return TokenCounts(data.seq_len, predicted=data.mask_rate)

  def __init__(self, *args):
    super().__init__(*args)
    tok, paths = self.tokenizer, list(self.cfg.data.paths) or 'the default corpus'
    for name, split in self.splits.items():
      check_split(split, name, paths)
    self.ids = SpecialIds(tok.special_ids['cls'], tok.special_ids['sep'], tok.pad_id)
    self.mode_id = most_frequent_token(self.splits['train'])
    common = dict(apply_fn=self.model.apply, pad_id=tok.pad_id, mask_id=tok.special_ids['mask'],
                  first_special=tok.first_special, num_ordinary=len(tok.ranks),
                  rate=self.cfg.data.mask_rate)
    self.loss_fn = functools.partial(objectives.mlm_nsp_loss, **common)
    self.eval_fn = functools.partial(objectives.mlm_nsp_eval_sums, **common, mode_id=self.mode_id)

  def batch_shapes(self):
    b, t = self.cfg.train.batch_size, self.cfg.data.seq_len
    return {'tokens': jax.ShapeDtypeStruct((b, t), jnp.int32),
            'segment_ids': jax.ShapeDtypeStruct((b, t), jnp.int32),
            'nsp_labels': jax.ShapeDtypeStruct((b,), jnp.int32)}

  def train_dataset(self, process_index, process_count):
    t = self.cfg.train
    return train_dataset(self.splits['train'], seq_len=self.cfg.data.seq_len,
                                 batch_size=t.batch_size, seed=t.seed, ids=self.ids,
                                 process_index=process_index, process_count=process_count)

  def eval_batches(self, max_batches):
    return eval_batches(self.splits['val'], seq_len=self.cfg.data.seq_len,
                                batch_size=self.cfg.train.batch_size, ids=self.ids,
                                seed=self.cfg.train.seed, max_batches=max_batches)

  def metrics(self, sums):
    return {k: float(v) for k, v in objectives.mlm_nsp_metrics(sums).items()}

  def report(self, params, val, mesh, base=None):
    mode = self.tokenizer.decode([self.mode_id])
    lines = ['(pairs and masks drawn from the held-out files):',
             f'  masked LM        accuracy {val["mlm_accuracy"]:.4f}   loss {val["mlm_loss"]:.4f}'
             f'   (always the most frequent token {mode!r}: {val["mlm_mode_accuracy"]:.4f})',
             f'  next sentence    accuracy {val["nsp_accuracy"]:.4f}   loss {val["nsp_loss"]:.4f}'
             '   (chance: 0.5)']
    for text in FILL_EXAMPLES:
      candidates = fill_mask(self.cfg.model, params, self.tokenizer, text, top_k=3)[0]
      lines.append(f'  fill_mask({text!r}): ' + ', '.join(f'{c!r} {p:.2f}' for c, p in candidates))
    return {}, lines
