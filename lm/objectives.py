"""One pure loss function per task: `loss_fn(params, batch, rng) -> (loss, metrics)`
once the model's apply function is bound with functools.partial.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lm.models import layers

ApplyFn = Callable[..., jax.Array]


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target, in float32 nats."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                         targets_BxT)


def clm_loss(params, batch: dict[str, jax.Array], rng: jax.Array, *, apply_fn: ApplyFn,
             pad_id: int, aux_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal LM: mean NLL of next tokens, padding targets left out; with `aux_coef`, plus that
  times the mixture-of-experts load-balancing loss (metrics: `nll`, `moe_aux`)."""
  del rng  # the decoder has no dropout
  if aux_coef:
    logits_BxTxV, state = apply_fn({'params': params}, batch['inputs'], mutable=['intermediates'])
  else:
    logits_BxTxV, state = apply_fn({'params': params}, batch['inputs']), {}
  nll_BxT = token_nll(logits_BxTxV, batch['targets'])
  mask_BxT = batch['targets'] != pad_id
  nll = jnp.sum(nll_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1)
  if not aux_coef:
    return nll, {'loss': nll}
  aux = layers.load_balancing_loss(_sown(state, 'router_probs'), _sown(state, 'expert_mask'))
  loss = nll + aux_coef * aux
  return loss, {'loss': loss, 'nll': nll, 'moe_aux': aux}


def _sown(state: dict, name: str) -> list[jax.Array]:
  return [x for path, x in jax.tree_util.tree_leaves_with_path(state)
          if name in jax.tree_util.keystr(path)]


def clm_eval_sums(params, batch: dict[str, jax.Array], *, apply_fn: ApplyFn, pad_id: int,
                  token_bytes_V: jax.Array) -> dict[str, jax.Array]:
  """Sums to add up over a split: NLL and count of non-padding targets, and the NLL and
  UTF-8 bytes of the targets that are text (special tokens have 0 bytes), for bits per byte.
  """
  targets_BxT = batch['targets']
  nll_BxT = token_nll(apply_fn({'params': params}, batch['inputs']), targets_BxT)
  mask_BxT = targets_BxT != pad_id
  bytes_BxT = token_bytes_V[targets_BxT]
  return {'nll': jnp.sum(nll_BxT * mask_BxT), 'tokens': jnp.sum(mask_BxT),
          'text_nll': jnp.sum(nll_BxT * (bytes_BxT > 0)), 'bytes': jnp.sum(bytes_BxT)}


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
  """Added-up sums -> mean loss per token and bits per UTF-8 byte."""
  return {'loss': sums['nll'] / max(sums['tokens'], 1),
          'bpb': sums['text_nll'] / (math.log(2) * max(sums['bytes'], 1))}
