"""Instruction tuning (`sft`, decoders): conversations (lm.data.conversations) rendered by
lm.data.chat_template.render, packed into rows, trained with the one causal loss on assistant tokens only.

Packing: the conversations of a split, in a fixed order (shuffled once by train.seed), fill rows
of data.seq_len + 1 tokens one after another; one that does not fit in what is left of a row
starts the next (the rest is padding, which no loss reads). Each row carries `segment_ids` (the
conversation, 1, 2, ...; 0 for padding) and `positions` (restarting at 0 in each), so attention
never crosses two conversations and positions start afresh in each. Cut policy: a conversation
longer than data.seq_len + 1 tokens keeps its first data.seq_len + 1 (its start: the system and
first user message and the beginning of the answer) and fills a row alone; the cut ones are
counted and said when the run starts. A conversation with no assistant message has nothing to
learn: it is skipped and counted.

Rows are shuffled anew every epoch by grain, and the grain iterator's state goes into every
checkpoint, as for `clm`. Metrics: `val/loss` (the loss on assistant tokens, end-of-turn
included) and `val/bpb` (its bits per byte). The final report adds `val/eot_rate`: the share of
held-out prompts (each conversation up to its first assistant message, with the generation
prompt) whose greedy reply ends with <|end_of_turn|> within train.sample_len tokens; with
train.init_from, the starting model's `val/base_loss`, `val/base_bpb` and `val/base_eot_rate`
too; then a few held-out conversations and the tuned model's replies.
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
from lm.data import chat_template, conversations
from lm.tasks.base import Task, batched, shuffled_indices, spread, stacked

if TYPE_CHECKING:
  from lm.config import Config

KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')
EOT_PROMPTS = 64  # held-out prompts the end-of-turn rate is measured on (the first that fit)


@dataclasses.dataclass(frozen=True)
class Packed:
  """One split's conversations packed into rows of R = data.seq_len + 1 tokens."""
  tokens_NxR: np.ndarray  # int32
  learn_NxR: np.ndarray  # bool: the token is one the loss predicts (assistant text, its EOT)
  segments_NxR: np.ndarray  # int32: the conversation within the row, 1, 2, ...; 0 padding
  positions_NxR: np.ndarray  # int32: position within its conversation
  conversations: list  # the messages of each conversation kept, in packing order
  num_cut: int  # longer than a row: kept their first R tokens
  num_skipped: int  # no assistant message


def pack(rendered: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
  """(tokens, learn, segments, positions) [N, row_len] and the number cut; see the module."""
  rows, row, cut = [], [], 0
  for ids, learn in rendered:
    if len(ids) > row_len:
      ids, learn, cut = ids[:row_len], learn[:row_len], cut + 1
    if sum(len(i) for i, _ in row) + len(ids) > row_len:
      rows.append(row)
      row = []
    row.append((ids, learn))
  if row:
    rows.append(row)
  out = (np.full((len(rows), row_len), pad_id, np.int32), np.zeros((len(rows), row_len), bool),
         np.zeros((len(rows), row_len), np.int32), np.zeros((len(rows), row_len), np.int32))
  for n, row in enumerate(rows):
    start = 0
    for segment, (ids, learn) in enumerate(row, 1):
      end = start + len(ids)
      out[0][n, start:end], out[1][n, start:end] = ids, learn
      out[2][n, start:end], out[3][n, start:end] = segment, np.arange(len(ids))
      start = end
  return (*out, cut)


def example(p: Packed, index: int) -> dict[str, np.ndarray]:
  """The causal example of row `index`: a target counts when the loss learns it and it belongs
  to the same conversation as its input."""
  tokens, segments = p.tokens_NxR[index], p.segments_NxR[index]
  same = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
  return {'inputs': tokens[:-1], 'targets': tokens[1:],
          'loss_mask': p.learn_NxR[index, 1:] & same, 'segment_ids': segments[:-1],
          'positions': p.positions_NxR[index, :-1]}


def load(cfg: Config, tokenizer) -> dict[str, Packed]:
  """Both splits' conversations, checked, rendered and packed."""
  found = {'train': [], 'val': []}
  for split, where, messages in conversations.split_conversations(cfg.data.paths,
                                                                    cfg.data.val_fraction):
    chat_template.check(messages, where)
    found[split].append(messages)
  out = {}
  for split, convs in found.items():
    kept = [m for m in convs if any(x['role'] == 'assistant' for x in m)]
    if split == 'train':
      kept = [kept[i] for i in np.random.default_rng(cfg.train.seed).permutation(len(kept))]
    rendered = [chat_template.render(tokenizer, m) for m in kept]
    *arrays, cut = pack(rendered, cfg.data.seq_len + 1, tokenizer.pad_id)
    out[split] = Packed(*arrays, kept, cut, len(convs) - len(kept))
  return out


class InstructionTuning(Task):
  name = 'sft'

  @classmethod
  def load(cls, cfg: Config, tokenizer) -> dict[str, Packed]:
    splits = load(cfg, tokenizer)
    where = ', '.join(cfg.data.paths) or 'the default conversations (Python stdlib)'
    for name, p in splits.items():
      print(f'sft {name}: {len(p.conversations)} conversations of {where} in '
            f'{len(p.tokens_NxR)} rows of {cfg.data.seq_len + 1} tokens; {p.num_cut} longer '
            f'than a row kept their first {cfg.data.seq_len + 1} tokens; {p.num_skipped} '
            'without an assistant message skipped')
    return splits

  def __init__(self, *args):
    super().__init__(*args)
    self.loss_fn = functools.partial(objectives.clm_loss, apply_fn=self.model.apply)
    self.eval_fn = functools.partial(objectives.clm_eval_sums, apply_fn=self.model.apply,
                                     token_bytes_V=jnp.asarray(self.tokenizer.token_bytes()))

  def batch_shapes(self):
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.bool_ if k == 'loss_mask' else jnp.int32)
            for k in KEYS}

  def train_dataset(self, process_index, process_count):
    t, packed = self.cfg.train, self.splits['train']
    ds = shuffled_indices(len(packed.tokens_NxR), t.seed)
    return batched(ds.map(lambda i: example(packed, i)), t.batch_size, process_index,
                   process_count)

  def eval_batches(self, max_batches):
    packed, batch_size = self.splits['val'], self.cfg.train.batch_size
    rows = [example(packed, int(i))
            for i in spread(len(packed.tokens_NxR), batch_size, max_batches)]
    return stacked(rows, batch_size, {k: np.zeros_like(v) for k, v in rows[0].items()})

  def metrics(self, sums):
    return objectives.clm_eval_metrics(sums)

  def prompts(self) -> list[tuple[list[dict], np.ndarray]]:
    """Held-out (messages before the first assistant reply, their ids with the generation
    prompt), the first EOT_PROMPTS that leave room for a reply."""
    out, room = [], self.cfg.model.max_len - max(1, self.cfg.train.sample_len)
    for messages in self.splits['val'].conversations:
      first = next(i for i, m in enumerate(messages) if m['role'] == 'assistant')
      ids, _ = chat_template.render(self.tokenizer, messages[:first], add_generation_prompt=True)
      if first and len(ids) <= room:
        out.append((messages[:first], ids))
    return out[:EOT_PROMPTS]

  def replies(self, params, mesh, prompts) -> list[list[int]]:
    t, tok = self.cfg.train, self.tokenizer
    in_vocabulary = lambda logits_BxV: jnp.where(  # init_from: the model's V may be larger
        jnp.arange(logits_BxV.shape[-1]) < tok.vocab_size, logits_BxV, -jnp.inf)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.RULES):
      return sampling.generate(self.cfg.model, params, [ids.tolist() for _, ids in prompts],
                               max_new_tokens=t.sample_len, filter_fn=in_vocabulary,
                               eos_id=tok.special_ids['end_of_turn'], pad_id=tok.pad_id).tokens

  def eot_rate(self, params, mesh, prompts) -> tuple[float, list[list[int]]]:
    eot = self.tokenizer.special_ids['end_of_turn']
    replies = self.replies(params, mesh, prompts) if prompts else []
    return (float(np.mean([bool(r) and r[-1] == eot for r in replies])) if replies
            else float('nan')), replies

  def report(self, params, val, mesh, base=None):
    prompts = self.prompts()
    rate, replies = self.eot_rate(params, mesh, prompts)
    extra = {'eot_rate': rate}
    lines = [f'({self.splits["val"].learn_NxR.sum():,} assistant tokens of '
             f'{len(self.splits["val"].conversations)} held-out conversations):']
    if base is not None:
      base_params, base_val = base
      extra.update(base_loss=base_val['loss'], base_bpb=base_val['bpb'],
                   base_eot_rate=self.eot_rate(base_params, mesh, prompts)[0])
      lines.append(f'  {"start":<6} loss {base_val["loss"]:.4f} nats/token   '
                   f'{base_val["bpb"]:.4f} bits/byte   replies ending with <|end_of_turn|> '
                   f'{extra["base_eot_rate"]:.0%}')
    lines.append(f'  {"tuned":<6} loss {val["loss"]:.4f} nats/token   {val["bpb"]:.4f} '
                 f'bits/byte   replies ending with <|end_of_turn|> {rate:.0%}')
    lines.append(f'  (of {len(prompts)} held-out prompts, {self.cfg.train.sample_len} tokens '
                 'at most, greedy)')
    for (messages, _), reply in list(zip(prompts, replies))[:self.cfg.train.num_samples]:
      shown = '\n'.join(f'[{m["role"]}] {m["content"]}' for m in messages)
      lines.append(f'\n--- conversation ---\n{shown}\n[assistant] {self.tokenizer.decode(reply)}')
    return extra, lines
