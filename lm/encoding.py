"""Using a trained encoder (BERT): fill in masked tokens, embed texts.

  cfg, params, tok = lm.load.model(Path('runs/encoder'))  # or a BERT HF directory
  fill_mask(cfg, params, tok, 'for i in ra[MASK]ge(n):')  # [[(text, probability), ...]]
  embed(cfg, params, tok, ['import os', 'def f(x):'], pooling='mean')  # [2, d_model] float32

A text is one segment, `[CLS] text [SEP]`. Each `[MASK]` in the text of `fill_mask` is one
[MASK] token (with the byte tokenizer, one byte); the text around it is encoded as ordinary
text, so no other text becomes a special token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import ConfigError
from lm.models import ModelConfig
from lm import models

MASK = '[MASK]'
POOLINGS = ('cls', 'mean')
LENGTH_BUCKET = 16  # batches are padded to a multiple of this: few shapes, few compilations


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(cfg: ModelConfig, params, tokens_BxT, padding_BxT, encode: bool):
  e = models.encoding(cfg)
  return (e.hidden if encode else e.mlm_logits)(params, tokens_BxT, padding_BxT)


def _padded(rows: list[list[int]], pad_id: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  length = min(-(-max(map(len, rows)) // LENGTH_BUCKET) * LENGTH_BUCKET, max_len)
  tokens_BxT = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens_BxT[i, :len(row)] = row
  return tokens_BxT, tokens_BxT != pad_id


def fill_mask(cfg: ModelConfig, params, tokenizer, text: str,
              top_k: int = 5) -> list[list[tuple[str, float]]]:
  """For each [MASK] of `text`, in order, its top_k (token text, probability) candidates
  among the ordinary tokens."""
  models.encoding(cfg)  # a family without one: a one-line ConfigError
  pieces = text.split(MASK)
  if len(pieces) == 1:
    raise ConfigError(f'text={text!r}: holds no {MASK}; put {MASK} where a token is to be '
                      f'predicted, e.g. "for i in ra{MASK}ge(n):"')
  if top_k < 1:
    raise ConfigError(f'top_k={top_k}: give at least 1')
  ids, where = [tokenizer.special_ids['cls']], []
  for i, piece in enumerate(pieces):
    ids += tokenizer.encode(piece)
    if i < len(pieces) - 1:
      where.append(len(ids))
      ids.append(tokenizer.special_ids['mask'])
  ids.append(tokenizer.special_ids['sep'])
  if len(ids) > cfg.max_len:
    raise ConfigError(f'text={text[:40]!r}...: {len(ids)} tokens with [CLS] and [SEP], more than '
                      f'the model\'s model.max_len={cfg.max_len}; shorten it')
  tokens_BxT, padding_BxT = _padded([ids], tokenizer.pad_id, cfg.max_len)
  logits_MxV = _apply(cfg, params, tokens_BxT, padding_BxT, False)[0, np.asarray(where)]
  ordinary_V = jnp.arange(logits_MxV.shape[-1]) < tokenizer.first_special
  probs_MxV = jax.nn.softmax(jnp.where(ordinary_V, logits_MxV, -jnp.inf), axis=-1)
  top_p_MxK, top_i_MxK = jax.device_get(
      jax.lax.top_k(probs_MxV, min(top_k, tokenizer.first_special)))
  return [[(tokenizer.decode([int(i)]), float(p)) for p, i in zip(ps, ids_)]
          for ps, ids_ in zip(top_p_MxK, top_i_MxK)]


def embed(cfg: ModelConfig, params, tokenizer, texts: list[str], pooling: str = 'cls',
          batch_size: int = 32) -> np.ndarray:
  """One vector per text, [N, d_model] float32: the final hidden state at [CLS] (`cls`) or the
  mean over the text's tokens, [CLS] and [SEP] included (`mean`). A text longer than the
  model's max_len keeps its first max_len - 2 tokens."""
  models.encoding(cfg)  # a family without one: a one-line ConfigError
  if pooling not in POOLINGS:
    raise ConfigError(f'pooling={pooling!r}: use one of {POOLINGS}')
  cls, sep = tokenizer.special_ids['cls'], tokenizer.special_ids['sep']
  rows = [[cls, *ids[:cfg.max_len - 2], sep] for ids in tokenizer.encode_batch(list(texts))]
  out = []
  for start in range(0, len(rows), batch_size):
    tokens_BxT, padding_BxT = _padded(rows[start:start + batch_size], tokenizer.pad_id,
                                       cfg.max_len)
    hidden_BxTxD = _apply(cfg, params, tokens_BxT, padding_BxT, True)
    if pooling == 'cls':
      out.append(np.asarray(hidden_BxTxD[:, 0]))
    else:
      weights_BxT = padding_BxT / padding_BxT.sum(axis=1, keepdims=True)
      out.append(np.einsum('btd,bt->bd', np.asarray(hidden_BxTxD), weights_BxT))
  return np.concatenate(out).astype(np.float32) if out else np.zeros((0, cfg.d_model), np.float32)
