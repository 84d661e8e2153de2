"""A task is a data pipeline plus a loss: what the one training loop (lm.train) trains on.

Each task gives the loop the same things: `loss_fn(params, batch, rng) -> (loss, metrics)`,
`eval_fn(params, batch, rng) -> sums` whose sums over a split `metrics(sums)` turns into
numbers, the shapes of a batch, a checkpointable training iterator, fixed evaluation batches,
and the lines of its final report. `make(cfg, ...)` picks the task of `data.task`:

- `clm`: causal language modelling (decoders): next-token loss, bits per byte beside gzip and
  xz, and a few samples;
- `mlm_nsp`: BERT's masked language modelling plus next-sentence prediction (encoders): MLM and
  NSP losses and accuracies beside the baselines of the most frequent token and of chance.
"""
from __future__ import annotations

import abc
import functools
import gzip
import lzma
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from lm import objectives, parallel, sampling
from lm.encoding import fill_mask
from lm.config import Config
from lm.data import clm, mlm_nsp, store

LAYOUTS = {'clm': 'documents', 'mlm_nsp': 'lines'}  # the token store each task reads
SAMPLE_PROMPTS = ('import ', 'def ', 'class ')
FILL_EXAMPLES = ('for i in ra[MASK]ge(n):', 'def __init__(se[MASK]f):', 'import o[MASK]')


def compressed_bits_per_byte(text: bytes) -> dict[str, float]:
  """Bits per byte of gzip -9 and xz -9 on the same text: baselines for val/bpb."""
  return {'gzip -9': 8 * len(gzip.compress(text, 9)) / len(text),
          'xz -9': 8 * len(lzma.compress(text, preset=9)) / len(text)}


class Task(abc.ABC):
  """The interface; see the module docstring. A subclass sets `name`, `loss_fn`, `eval_fn`."""
  name: str
  loss_fn: Any
  eval_fn: Any

  def __init__(self, cfg: Config, model: nn.Module, tokenizer, splits: dict[str, store.Split]):
    self.cfg, self.model, self.tokenizer, self.splits = cfg, model, tokenizer, splits

  @abc.abstractmethod
  def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shapes and dtypes of one training batch."""

  @abc.abstractmethod
  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    """Endless, checkpointable batches of this host's rows."""

  @abc.abstractmethod
  def eval_batches(self, max_batches: int | None) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches (all of the split for None)."""

  @abc.abstractmethod
  def metrics(self, sums: dict[str, float]) -> dict[str, float]:
    """Sums of eval_fn over a split -> its metrics."""

  @abc.abstractmethod
  def report(self, params, val: dict[str, float], mesh) -> tuple[dict[str, float], list[str]]:
    """The final numbers beyond `val` and the lines that show them."""


class CausalLM(Task):
  name = 'clm'

  def __init__(self, *args):
    super().__init__(*args)
    tok = self.tokenizer
    self.loss_fn = functools.partial(
        objectives.clm_loss, apply_fn=self.model.apply, pad_id=tok.pad_id,
        aux_coef=self.cfg.model.moe_aux_coef if self.cfg.model.num_experts else 0.0)
    self.eval_fn = functools.partial(objectives.clm_eval_sums, apply_fn=self.model.apply,
                                     pad_id=tok.pad_id,
                                     token_bytes_V=jnp.asarray(tok.token_bytes()))

  def batch_shapes(self):
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ('inputs', 'targets')}

  def train_dataset(self, process_index, process_count):
    t = self.cfg.train
    return clm.train_dataset(self.splits['train'].tokens, seq_len=self.cfg.data.seq_len,
                             batch_size=t.batch_size, seed=t.seed, process_index=process_index,
                             process_count=process_count)

  def eval_batches(self, max_batches):
    return clm.eval_batches(self.splits['val'].tokens, seq_len=self.cfg.data.seq_len,
                            batch_size=self.cfg.train.batch_size, pad_id=self.tokenizer.pad_id,
                            max_batches=max_batches)

  def metrics(self, sums):
    return objectives.clm_eval_metrics(sums)

  def report(self, params, val, mesh):
    seq_len, val_tokens = self.cfg.data.seq_len, self.splits['val'].tokens
    covered = clm.num_windows(len(val_tokens), seq_len) * seq_len
    text = self.tokenizer.decode(np.asarray(val_tokens[1:covered + 1]).tolist()).encode('utf-8')
    baselines = compressed_bits_per_byte(text)
    lines = [f'({len(text):,} bytes of held-out text):',
             f'  {"model":<10} loss {val["loss"]:.4f} nats/token   {val["bpb"]:.4f} bits/byte']
    lines += [f'  {name:<10} {"":27} {bpb:.4f} bits/byte' for name, bpb in baselines.items()]
    for i, sample in enumerate(self.samples(params, mesh)):
      lines.append(f'\n--- sample {i + 1} ---\n{sample}')
    return {'gzip_bpb': baselines['gzip -9'], 'xz_bpb': baselines['xz -9']}, lines

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


class MaskedLM(Task):
  name = 'mlm_nsp'

  def __init__(self, *args):
    super().__init__(*args)
    tok, paths = self.tokenizer, list(self.cfg.data.paths) or 'the default corpus'
    for name, split in self.splits.items():
      mlm_nsp.check_split(split, name, paths)
    self.ids = mlm_nsp.SpecialIds(tok.special_ids['cls'], tok.special_ids['sep'], tok.pad_id)
    self.mode_id = mlm_nsp.most_frequent_token(self.splits['train'])
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
    return mlm_nsp.train_dataset(self.splits['train'], seq_len=self.cfg.data.seq_len,
                                 batch_size=t.batch_size, seed=t.seed, ids=self.ids,
                                 process_index=process_index, process_count=process_count)

  def eval_batches(self, max_batches):
    return mlm_nsp.eval_batches(self.splits['val'], seq_len=self.cfg.data.seq_len,
                                batch_size=self.cfg.train.batch_size, ids=self.ids,
                                seed=self.cfg.train.seed, max_batches=max_batches)

  def metrics(self, sums):
    return {k: float(v) for k, v in objectives.mlm_nsp_metrics(sums).items()}

  def report(self, params, val, mesh):
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


TASKS = {task.name: task for task in (CausalLM, MaskedLM)}


def make(cfg: Config, model: nn.Module, tokenizer, splits: dict[str, store.Split]) -> Task:
  return TASKS[cfg.data.task](cfg, model, tokenizer, splits)
