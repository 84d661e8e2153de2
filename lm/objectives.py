"""One pure loss function per task family: `loss_fn(params, batch, rng) -> (loss, metrics)`
once the model's apply function is bound with functools.partial: causal LM, masked LM plus
next-sentence prediction, sequence to sequence.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax


ApplyFn = Callable[..., jax.Array]


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target, in float32 nats."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                         targets_BxT)


PACKING = ('segment_ids', 'positions')  # the keys of a causal batch whose rows are packed


def _packing(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """A packed batch's segment_ids and positions, as the decoder's keyword arguments."""
  return {k: batch[k] for k in PACKING if k in batch}


def clm_loss(params, batch: dict[str, jax.Array], rng: jax.Array, *,
             apply_fn: ApplyFn) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal LM: mean NLL of the targets where `batch['loss_mask']` is true, plus each auxiliary
  loss the model returns (`with_aux=True`: name -> (value, weight); a mixture of experts'
  `moe_aux`, and its dropped share `moe_dropped` at weight 0, logged only) times its weight
  (metrics: `loss`, with auxiliary losses also `nll` and each of them, and `loss_tokens`, the
  count of targets the mean is over).
  A batch of packed rows also carries `segment_ids` and `positions` [B, T]: no token attends
  across (or carries a scan state across) two segments, and positions restart in each."""
  del rng  # the decoder has no dropout
  logits_BxTxV, aux = apply_fn({'params': params}, batch['inputs'], with_aux=True,
                               **_packing(batch))
  nll_BxT = token_nll(logits_BxTxV, batch['targets'])
  mask_BxT = batch['loss_mask']
  tokens = jnp.sum(mask_BxT)
  nll = jnp.sum(nll_BxT * mask_BxT) / jnp.maximum(tokens, 1)
  if not aux:
    return nll, {'loss': nll, 'loss_tokens': tokens}
  loss = nll + sum(weight * value for value, weight in aux.values())
  return loss, {'loss': loss, 'nll': nll, **{k: value for k, (value, _) in aux.items()},
                'loss_tokens': tokens}


def clm_eval_sums(params, batch: dict[str, jax.Array], rng: jax.Array, *, apply_fn: ApplyFn,
                  token_bytes_V: jax.Array) -> dict[str, jax.Array]:
  """Sums to add up over a split (`rng` unused): NLL and count of the targets in `loss_mask`,
  and the NLL and UTF-8 bytes of those that are text (special tokens have 0 bytes), for bits
  per byte."""
  targets_BxT, mask_BxT = batch['targets'], batch['loss_mask']
  nll_BxT = token_nll(apply_fn({'params': params}, batch['inputs'], **_packing(batch)),
                      targets_BxT)
  bytes_BxT = token_bytes_V[targets_BxT] * mask_BxT
  return {'nll': jnp.sum(nll_BxT * mask_BxT), 'tokens': jnp.sum(mask_BxT),
          'text_nll': jnp.sum(nll_BxT * (bytes_BxT > 0)), 'bytes': jnp.sum(bytes_BxT)}


def clm_eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Added-up sums -> mean loss per token and bits per UTF-8 byte."""
  return {'loss': sums['nll'] / max(sums['tokens'], 1),
          'bpb': sums['text_nll'] / (math.log(2) * max(sums['bytes'], 1))}


# --- masked language modelling + next-sentence prediction (BERT) ---------------------------

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the other 10% stay as they are


def mask_tokens(rng: jax.Array, tokens_BxT: jax.Array, eligible_BxT: jax.Array, rate: float,
                mask_id: int, num_ordinary: int) -> tuple[jax.Array, jax.Array]:
  """BERT's corruption: in each row, round(rate * eligible tokens) of them (at least 1 when
  any is eligible), chosen uniformly; of those 80% become mask_id, 10% a token drawn uniformly
  from the ordinary ids [0, num_ordinary), 10% stay. Returns (inputs_BxT, chosen_BxT)."""
  choose, action, replace = jax.random.split(rng, 3)
  count_B = jnp.sum(eligible_BxT, axis=1)
  picks_B = jnp.where(count_B > 0, jnp.maximum(1, jnp.round(rate * count_B)), 0)
  scores_BxT = jnp.where(eligible_BxT, jax.random.uniform(choose, tokens_BxT.shape), 2.0)
  rank_BxT = jnp.argsort(jnp.argsort(scores_BxT, axis=1), axis=1)  # 0: the lowest score
  chosen_BxT = rank_BxT < picks_B[:, None]
  u_BxT = jax.random.uniform(action, tokens_BxT.shape)
  random_BxT = jax.random.randint(replace, tokens_BxT.shape, 0, num_ordinary, tokens_BxT.dtype)
  inputs_BxT = jnp.where(chosen_BxT & (u_BxT < MASK_SHARE), mask_id, tokens_BxT)
  inputs_BxT = jnp.where(chosen_BxT & (u_BxT >= MASK_SHARE) & (u_BxT < MASK_SHARE + RANDOM_SHARE),
                         random_BxT, inputs_BxT)
  return inputs_BxT, chosen_BxT


def mlm_nsp_terms(mlm_logits_BxTxV: jax.Array, nsp_logits_Bx2: jax.Array, targets_BxT: jax.Array,
                  chosen_BxT: jax.Array, nsp_labels_B: jax.Array) -> dict[str, jax.Array]:
  """Sums: NLL and correct argmax predictions over the chosen positions (T: all positions, or
  the gathered ones) and over the rows with an NSP label (label < 0: none), with counts."""
  nll_BxT = token_nll(mlm_logits_BxTxV, targets_BxT)
  right_BxT = jnp.argmax(mlm_logits_BxTxV, axis=-1) == targets_BxT
  labelled_B = nsp_labels_B >= 0
  labels_B = jnp.maximum(nsp_labels_B, 0)
  nsp_nll_B = optax.softmax_cross_entropy_with_integer_labels(nsp_logits_Bx2, labels_B)
  return {'mlm_nll': jnp.sum(nll_BxT * chosen_BxT), 'mlm_correct': jnp.sum(right_BxT & chosen_BxT),
          'mlm_count': jnp.sum(chosen_BxT),
          'nsp_nll': jnp.sum(nsp_nll_B * labelled_B),
          'nsp_correct': jnp.sum((jnp.argmax(nsp_logits_Bx2, -1) == labels_B) & labelled_B),
          'nsp_count': jnp.sum(labelled_B)}


def mlm_nsp_metrics(sums: dict) -> dict:
  """Sums -> loss (MLM mean NLL + NSP mean NLL, as Hugging Face's BertForPreTraining) and the
  MLM and NSP losses and accuracies."""
  per = lambda key, count: sums[key] / jnp.maximum(sums[count], 1)
  out = {'mlm_loss': per('mlm_nll', 'mlm_count'), 'mlm_accuracy': per('mlm_correct', 'mlm_count'),
         'nsp_loss': per('nsp_nll', 'nsp_count'), 'nsp_accuracy': per('nsp_correct', 'nsp_count')}
  if 'mode_correct' in sums:
    out['mlm_mode_accuracy'] = per('mode_correct', 'mlm_count')
  return {'loss': out['mlm_loss'] + out['nsp_loss'], **out}


def _mlm_nsp_sums(params, batch, rng, apply_fn, pad_id, mask_id, first_special, num_ordinary,
                  rate) -> tuple[dict, jax.Array, jax.Array]:
  """Masks, the model's logits at the M = ceil(rate * T) slots that can hold a chosen position
  (the vocabulary projection runs there only), and the sums."""
  tokens_BxT = batch['tokens']
  inputs_BxT, chosen_BxT = mask_tokens(rng, tokens_BxT, tokens_BxT < first_special, rate,
                                       mask_id, num_ordinary)
  length = tokens_BxT.shape[1]
  slots = min(length, max(1, math.ceil(rate * length)))  # >= any row's count of chosen ones
  positions_BxM = jnp.argsort(~chosen_BxT, axis=1, stable=True)[:, :slots]  # chosen first
  used_BxM = jnp.take_along_axis(chosen_BxT, positions_BxM, axis=1)
  mlm_logits_BxMxV, nsp_logits_Bx2 = apply_fn(
      {'params': params}, inputs_BxT, segment_ids=batch['segment_ids'],
      padding_mask=tokens_BxT != pad_id, positions_BxM=positions_BxM)
  sums = mlm_nsp_terms(mlm_logits_BxMxV, nsp_logits_Bx2,
                       jnp.take_along_axis(tokens_BxT, positions_BxM, axis=1), used_BxM,
                       batch['nsp_labels'])
  return sums, tokens_BxT, chosen_BxT


def mlm_nsp_loss(params, batch: dict[str, jax.Array], rng: jax.Array, *, apply_fn: ApplyFn,
                 pad_id: int, mask_id: int, first_special: int, num_ordinary: int,
                 rate: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BERT pre-training: masks drawn from `rng` (fresh each step) over the ordinary tokens
  (ids < first_special: never [CLS], [SEP] or padding); loss = MLM + NSP cross-entropy."""
  sums, _, _ = _mlm_nsp_sums(params, batch, rng, apply_fn, pad_id, mask_id, first_special,
                             num_ordinary, rate)
  metrics = mlm_nsp_metrics(sums)
  return metrics['loss'], metrics


def mlm_nsp_eval_sums(params, batch: dict[str, jax.Array], rng: jax.Array, *, apply_fn: ApplyFn,
                      pad_id: int, mask_id: int, first_special: int, num_ordinary: int,
                      rate: float, mode_id: int) -> dict[str, jax.Array]:
  """Sums over a split (masks from `rng`), with `mode_correct`: the chosen positions whose
  token is mode_id, the accuracy of always predicting the most frequent token."""
  sums, tokens_BxT, chosen_BxT = _mlm_nsp_sums(params, batch, rng, apply_fn, pad_id, mask_id,
                                               first_special, num_ordinary, rate)
  return {**sums, 'mode_correct': jnp.sum((tokens_BxT == mode_id) & chosen_BxT)}


# --- sequence to sequence (encoder-decoder) ------------------------------------------------

def shift_right(targets_BxT: jax.Array, start_id: int) -> jax.Array:
  """The decoder's inputs: the start token, then the targets but the last (teacher forcing)."""
  start_Bx1 = jnp.full((targets_BxT.shape[0], 1), start_id, targets_BxT.dtype)
  return jnp.concatenate([start_Bx1, targets_BxT[:, :-1]], axis=1)


def _seq2seq_nll(params, batch: dict[str, jax.Array], apply_fn: ApplyFn, start_id: int
                 ) -> tuple[jax.Array, jax.Array]:
  """(nll_BxT, argmax_BxT) of the targets; the encoder reads `inputs` where `input_mask`."""
  logits_BxTxV = apply_fn({'params': params}, batch['inputs'],
                          shift_right(batch['targets'], start_id),
                          padding_mask=batch['input_mask'])
  return token_nll(logits_BxTxV, batch['targets']), jnp.argmax(logits_BxTxV, axis=-1)


def seq2seq_loss(params, batch: dict[str, jax.Array], rng: jax.Array, *, apply_fn: ApplyFn,
                 start_id: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean NLL of the targets where `loss_mask` (the encoder reads `inputs` where `input_mask`,
  the decoder the targets shifted right behind start_id), the per-token accuracy, and
  `loss_tokens`, the count of targets the mean is over. (Span corruption makes the batch from
  the step's key before the loss: the task's `prepare`.)"""
  del rng
  nll_BxT, argmax_BxT = _seq2seq_nll(params, batch, apply_fn, start_id)
  mask_BxT = batch['loss_mask']
  tokens = jnp.sum(mask_BxT)
  count = jnp.maximum(tokens, 1)
  nll = jnp.sum(nll_BxT * mask_BxT) / count
  return nll, {'loss': nll, 'loss_tokens': tokens,
               'accuracy': jnp.sum((argmax_BxT == batch['targets']) & mask_BxT) / count}


def seq2seq_eval_sums(params, batch: dict[str, jax.Array], rng: jax.Array, *,
                      apply_fn: ApplyFn, start_id: int, token_bytes_V: jax.Array,
                      mode_id: int) -> dict[str, jax.Array]:
  """Sums over a split (`rng` unused: evaluation batches are drawn once): as clm_eval_sums,
  plus the targets predicted right (argmax) and those equal to mode_id (the accuracy of
  always predicting the most frequent target token)."""
  del rng
  nll_BxT, argmax_BxT = _seq2seq_nll(params, batch, apply_fn, start_id)
  targets_BxT, mask_BxT = batch['targets'], batch['loss_mask']
  bytes_BxT = token_bytes_V[targets_BxT] * mask_BxT
  return {'nll': jnp.sum(nll_BxT * mask_BxT), 'tokens': jnp.sum(mask_BxT),
          'text_nll': jnp.sum(nll_BxT * (bytes_BxT > 0)), 'bytes': jnp.sum(bytes_BxT),
          'correct': jnp.sum((argmax_BxT == targets_BxT) & mask_BxT),
          'mode_correct': jnp.sum((targets_BxT == mode_id) & mask_BxT)}


def seq2seq_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Added-up sums -> loss and bpb (as clm_eval_metrics), accuracy and the mode's."""
  tokens = max(sums['tokens'], 1)
  return {**clm_eval_metrics(sums), 'accuracy': sums['correct'] / tokens,
          'mode_accuracy': sums['mode_correct'] / tokens}
