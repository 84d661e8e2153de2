"""Generation on the decoding interface (lm.models.decoding): sampling, beam search, streaming.

A filter is a pure function logits_BxV -> logits_BxV that masks what may not be drawn with
-inf; `chain` composes them in order. Writing one function adds a method:

  def ban(ids):                                         # never emit these tokens
    return lambda logits_BxV: logits_BxV.at[:, ids].set(-jnp.inf)
  generate(cfg, params, prompts, max_new_tokens=64, rng=key,
           filter_fn=chain(ban([0, 1]), temperature(0.8), top_p(0.95)))

The filters here are frozen dataclasses, so equal filters hash equal and `generate` compiles
once per shape; a user's function compiles once per function object.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import models
from lm.backend import decoding_jit
from lm.errors import require
from lm.models import ModelConfig
from lm.data import fim
from lm.tokenizers.tokenizer import StreamDecoder

Filter = Callable[[jax.Array], jax.Array]
PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: fewer shapes to compile


def _probs(logits_BxV: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class Temperature:
  t: float

  def __call__(self, logits_BxV: jax.Array) -> jax.Array:
    if self.t == 0:  # greedy: the most likely tokens (all of them, if tied)
      top_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
      return jnp.where(logits_BxV >= top_Bx1, 0.0, -jnp.inf)
    return logits_BxV / self.t


def _sortable(x: jax.Array) -> jax.Array:
  """float32 -> int32 in the same order (an involution: it also maps back)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _least(ok: Callable[[jax.Array], jax.Array], lo_Bx1: jax.Array, hi_Bx1: jax.Array):
  """The least int32 t in [lo, hi] with ok(t), for ok False then True along the range (ok(hi)
  must hold): a bisection of 32 passes over the vocabulary, where a sort is slow on CPU."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    good = ok(mid)
    return jnp.where(good, lo, mid + 1), jnp.where(good, mid, hi)
  return jax.lax.fori_loop(0, 32, halve, (lo_Bx1, hi_Bx1))[1]


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int

  def __call__(self, logits_BxV: jax.Array) -> jax.Array:
    """Keeps the k most likely tokens, and every token tied with the k-th."""
    if self.k >= logits_BxV.shape[-1]:
      return logits_BxV
    # The least of the top k, not its last column: XLA:CPU turns a top_k whose output is
    # sliced into a full sort (measured: experiments/README.md, Sampling).
    kth_Bx1 = jnp.min(jax.lax.top_k(logits_BxV, self.k)[0], axis=-1, keepdims=True)
    return jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)


TOP_P_CANDIDATES = 64  # top_p looks for its nucleus among this many most likely tokens first


@dataclasses.dataclass(frozen=True)
class TopP:
  p: float

  def __call__(self, logits_BxV: jax.Array) -> jax.Array:
    """Nucleus: in order of probability, tokens are kept while the mass before them is below
    p (so the token that reaches p is kept), and so is every token tied with the last kept.
    That is: token i is kept iff the mass of the tokens more likely than it is below p.

    The least kept probability is found among the TOP_P_CANDIDATES most likely tokens when
    every row's nucleus lies within them (the least of them is not kept; always so after a
    top_k of fewer tokens). Otherwise, a bisection of 32 passes over the float bits of the
    probabilities (no sort: XLA:CPU sorts slowly)."""
    if self.p >= 1.0:
      return logits_BxV
    probs_BxV = _probs(logits_BxV)
    keys_BxV = _sortable(probs_BxV)
    top_BxC = jax.lax.top_k(probs_BxV, min(TOP_P_CANDIDATES, probs_BxV.shape[-1]))[0]
    above_BxC = jnp.sum(jnp.where(top_BxC[:, None, :] > top_BxC[:, :, None], top_BxC[:, None, :],
                                  0.0), axis=-1)  # the mass more likely than each candidate
    kept_BxC = above_BxC < self.p
    inside = jnp.all(jnp.any(~kept_BxC, axis=-1))  # every row's nucleus among its candidates
    below_p = lambda t_Bx1: jnp.sum(jnp.where(keys_BxV > t_Bx1, probs_BxV, 0.0), -1,
                                    keepdims=True) < self.p
    least_Bx1 = jax.lax.cond(
        inside,
        lambda: _sortable(jnp.min(jnp.where(kept_BxC, top_BxC, jnp.inf), -1, keepdims=True)),
        lambda: _least(below_p, jnp.zeros_like(keys_BxV[:, :1]),
                       jnp.max(keys_BxV, -1, keepdims=True)))
    return jnp.where(keys_BxV >= least_Bx1, logits_BxV, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class MinP:
  alpha: float

  def __call__(self, logits_BxV: jax.Array) -> jax.Array:
    """Drops tokens less likely than alpha times the most likely one."""
    probs_BxV = _probs(logits_BxV)
    floor_Bx1 = self.alpha * jnp.max(probs_BxV, axis=-1, keepdims=True)
    return jnp.where(probs_BxV >= floor_Bx1, logits_BxV, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Chain:
  filters: tuple[Filter, ...]

  def __call__(self, logits_BxV: jax.Array) -> jax.Array:
    for f in self.filters:
      logits_BxV = f(logits_BxV)
    return logits_BxV


def temperature(t: float) -> Filter:
  """Divides the logits by t; t = 0 is greedy."""
  require(t >= 0, 'temperature', t, 'must be >= 0 (0 is greedy)')
  return Temperature(float(t))


def top_k(k: int) -> Filter:
  require(isinstance(k, (int, np.integer)) and k >= 1, 'top_k', k,
          'must be an integer >= 1 (a k of the vocabulary size or more keeps every token)')
  return TopK(int(k))


def top_p(p: float) -> Filter:
  require(0 < p <= 1, 'top_p', p, 'must be in (0, 1] (1 keeps every token)')
  return TopP(float(p))


def min_p(alpha: float) -> Filter:
  require(0 <= alpha < 1, 'min_p', alpha, 'must be in [0, 1) (0 keeps every token)')
  return MinP(float(alpha))


def chain(*filters: Filter) -> Filter:
  """The filters applied in order."""
  return Chain(tuple(filters))


def make_filter(temperature_: float = 1.0, top_k_: int = 0, top_p_: float = 1.0,
                min_p_: float = 0.0) -> Filter:
  """The usual chain, each step only when it does something: temperature, top-k (0: off),
  top-p, min-p. A temperature of 0 is greedy and the rest is moot."""
  if temperature_ == 0:
    return temperature(0.0)
  steps = [temperature(temperature_)]
  if top_k_:
    steps.append(top_k(top_k_))
  if top_p_ != 1.0:
    steps.append(top_p(top_p_))
  if min_p_:
    steps.append(min_p(min_p_))
  return chain(*steps)


GREEDY = Temperature(0.0)


# --- batches of prompts --------------------------------------------------------------------

def fit_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                truncate: bool = False) -> list[list[int]]:
  """Checks that each prompt and its new tokens fit the model's context (its decoding
  interface's prompt_room: a decoder's max_len less the new tokens, none for a model without
  attention or learned positions; an encoder-decoder's encoder max_len); `truncate` keeps a
  long prompt's last tokens instead of refusing it."""
  require(len(prompts) > 0, 'prompts', prompts, 'give at least one prompt')
  d = models.decoding(cfg)
  context, room = d.max_len, d.prompt_room(max_new_tokens)
  most_new = d.new_tokens_room(1)
  require(max_new_tokens >= 1 and (most_new is None or max_new_tokens <= most_new),
          'max_new_tokens', max_new_tokens,
          'must be >= 1' if most_new is None else f'must be in [1, the model context {context})')
  out = []
  for i, prompt in enumerate(prompts):
    prompt = [int(t) for t in prompt]
    require(len(prompt) > 0, f'prompts[{i}]', prompt,
            'is empty: give at least one token (lm.sample starts every prompt with BOS)')
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    require(not bad, f'prompts[{i}]', bad[:5], f'ids outside the vocabulary [0, {cfg.vocab_size})')
    if room is not None and len(prompt) > room:
      require(truncate, f'prompts[{i}]', f'{len(prompt)} tokens',
              f'with max_new_tokens={max_new_tokens} it exceeds the model context '
              f'{context}: shorten it, lower max_new_tokens, or truncate to keep its last '
              f'{room} tokens')
      prompt = prompt[-room:]
    out.append(prompt)
  return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_BxT, right-aligned (T: the longest, rounded up to PROMPT_BUCKET), and lengths_B."""
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  width = -(-int(lengths_B.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens_BxT = np.full((len(prompts), width), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens_BxT[b, width - len(p):] = p
  return tokens_BxT, lengths_B


# --- sampling ------------------------------------------------------------------------------

@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # each row's new tokens, through its EOS if it drew one
  logprobs: list[list[float]] | None  # with return_logprobs: each token's log-probability
                                      # under the model (before the filters)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: jax.Array | None = None, filter_fn: Filter = GREEDY, eos_id: int | None = None,
             pad_id: int = 0, truncate: bool = False,
             return_logprobs: bool = False) -> Generation:
  """Continues each prompt by up to max_new_tokens: a prefill of the left-padded batch
  (`prefill`), then one jax.lax.while_loop of decode steps that ends when every row has drawn
  eos_id or the budget is spent. Deterministic for a given rng (step i draws with
  fold_in(rng, i))."""
  prompts = fit_prompts(cfg, prompts, max_new_tokens, truncate)
  tokens_BxT, lengths_B = left_pad(prompts, pad_id)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  logits_BxV, state = prefill(cfg, params, tokens_BxT, lengths_B,
                              max_len=tokens_BxT.shape[1] + max_new_tokens)
  out_BxN, logprobs_BxN, count_B = jax.device_get(_sample_loop(
      cfg, params, logits_BxV, state, rng, max_new_tokens=max_new_tokens,
      filter_fn=filter_fn, eos_id=-1 if eos_id is None else eos_id,
      return_logprobs=return_logprobs))
  return Generation([out_BxN[b, :n].tolist() for b, n in enumerate(count_B)],
                    [logprobs_BxN[b, :n].tolist() for b, n in enumerate(count_B)]
                    if return_logprobs else None)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_len'))
def prefill(cfg: ModelConfig, params, tokens_BxT: jax.Array, lengths_B: jax.Array, *,
            max_len: int) -> tuple[jax.Array, dict]:
  """The left-padded prompts through the model (the decoding interface's prefill): each row's
  next-token logits and the state to decode up to max_len columns from. Compiled apart from
  the decoding loops: its matmuls have many rows (a T5 encoder at batch 8 x 256: 2,048), which
  the training matmuls run faster than the decoding loops' (lm.backend.decoding_jit)."""
  return models.decoding(cfg).prefill(params, tokens_BxT, lengths_B, max_len)


@decoding_jit(rows=lambda cfg, params, logits_BxV, *args, **kwargs: logits_BxV.shape[0],
              static_argnames=('cfg', 'max_new_tokens', 'filter_fn', 'eos_id', 'return_logprobs'))
def _sample_loop(cfg, params, logits_BxV, state, rng, *, max_new_tokens, filter_fn, eos_id,
                 return_logprobs):
  batch = logits_BxV.shape[0]
  d = models.decoding(cfg)
  params = d.prepare(params, batch)

  def next_token(i, logits_BxV, done_B):
    token_B = pick(filter_fn, logits_BxV, jax.random.fold_in(rng, i))
    logprob_B = (jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None], -1)[:, 0]
                 if return_logprobs else jnp.zeros(token_B.shape))
    return jnp.where(done_B, 0, token_B).astype(jnp.int32), logprob_B

  def cond(carry):
    i, _, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, logits_BxV, state, out_BxN, logprobs_BxN, done_B, count_B = carry
    token_B, logprob_B = next_token(i, logits_BxV, done_B)
    out_BxN = out_BxN.at[:, i].set(token_B)
    logprobs_BxN = logprobs_BxN.at[:, i].set(logprob_B)
    count_B = count_B + ~done_B
    done_B = done_B | (token_B == eos_id)
    logits_BxV, state = d.decode_step(params, token_B, state)
    return i + 1, logits_BxV, state, out_BxN, logprobs_BxN, done_B, count_B

  carry = (jnp.int32(0), logits_BxV, state, jnp.zeros((batch, max_new_tokens), jnp.int32),
           jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.int32))
  _, _, _, out_BxN, logprobs_BxN, _, count_B = jax.lax.while_loop(cond, body, carry)
  return replicated((out_BxN, logprobs_BxN, count_B))


def replicated(tree):
  """`tree` whole on every device of the ambient mesh (if one is set), so that every process
  of a multi-process run can read it."""
  if jax.sharding.get_abstract_mesh().empty:
    return tree
  return jax.lax.with_sharding_constraint(tree, jax.sharding.PartitionSpec())


def pick(filter_fn: Filter, logits_BxV: jax.Array, key: jax.Array) -> jax.Array:
  """A token per row from the filtered logits: the first most likely for greedy (no random
  numbers to draw), else a draw from their softmax."""
  if filter_fn == GREEDY:
    return first_argmax(logits_BxV)
  return draw(filter_fn(logits_BxV), key)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
  """jnp.argmax (the first index of each row's maximum) as two plain reductions, the maximum
  and then the least index that holds it: XLA:CPU reduces (value, index) pairs slowly."""
  top_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  index_V = jnp.arange(x_BxV.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x_BxV == top_Bx1, index_V, x_BxV.shape[-1]), axis=-1)


def draw(logits_BxV: jax.Array, key: jax.Array) -> jax.Array:
  """A token per row from softmax(logits) by inverse CDF: one uniform number per row, where
  jax.random.categorical draws Gumbel noise for every logit (faster on CPU: experiments/README.md,
  Sampling). A token of probability 0 (a -inf logit) is never drawn."""
  probs_BxV = _probs(logits_BxV)
  cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
  u_Bx1 = jax.random.uniform(key, (logits_BxV.shape[0], 1)) * cdf_BxV[:, -1:]
  token_B = jnp.sum(cdf_BxV <= u_Bx1, axis=-1)  # the first token whose cdf exceeds u
  # u * total may round up to the total: then the last token with any probability.
  last_B = jnp.max(jnp.where(probs_BxV > 0, jnp.arange(logits_BxV.shape[-1]), 0), axis=-1)
  return jnp.minimum(token_B, last_B)


# --- streaming -----------------------------------------------------------------------------

def stream(cfg: ModelConfig, params, tokenizer, prompt: Sequence[int], *, max_new_tokens: int,
           rng: jax.Array | None = None, filter_fn: Filter = GREEDY,
           truncate: bool = False, stop_id: int | None = None) -> Iterator[str]:
  """Yields the continuation's text as it is drawn (the tokens `generate` draws for this prompt
  and key), through the tokenizer's StreamDecoder; stops at `stop_id` (default: the
  tokenizer's EOS; a chat reply's is <|end_of_turn|>)."""
  stop_id = tokenizer.eos_id if stop_id is None else stop_id
  (prompt,) = fit_prompts(cfg, [prompt], max_new_tokens, truncate)
  tokens_1xT, lengths_1 = left_pad([prompt], tokenizer.pad_id)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  logits_1xV, cache = prefill(cfg, params, tokens_1xT, lengths_1,
                              max_len=tokens_1xT.shape[1] + max_new_tokens)
  params = models.decoding(cfg).prepare(params, rows=1)
  text = StreamDecoder(tokenizer)
  for i in range(max_new_tokens):
    token, logits_1xV, cache = _stream_step(cfg, params, logits_1xV, cache, rng, i, filter_fn)
    token = int(token)
    if token == stop_id:
      break
    piece = text.feed([token])
    if piece:
      yield piece
  rest = text.flush()
  if rest:
    yield rest


@decoding_jit(static_argnames=('cfg', 'filter_fn'))
def _stream_step(cfg, params, logits_1xV, cache, rng, i, filter_fn):
  token_1 = pick(filter_fn, logits_1xV, jax.random.fold_in(rng, i))
  token_1 = token_1.astype(jnp.int32)
  logits_1xV, cache = models.decoding(cfg).decode_step(params, token_1, cache)
  return token_1[0], logits_1xV, cache


def infill_prompt(tokenizer, prefix: str, suffix: str, spm: bool = False) -> list[int]:
  """BOS <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>: a document's PSM layout
  (lm.data.fim.arrange) up to its middle; with `spm`, the SPM layout BOS <|fim_suffix|> suffix
  <|fim_prefix|> prefix <|fim_middle|>, where the middle continues the prefix directly."""
  return [tokenizer.bos_id, *fim.arrange(tokenizer, prefix, '', suffix, spm=spm)]


def infill(cfg: ModelConfig, params, tokenizer, prefix: str, suffix: str, *,
           max_new_tokens: int, rng: jax.Array | None = None, filter_fn: Filter = GREEDY,
           truncate: bool = False) -> str:
  """The middle between `prefix` and `suffix` that a model trained with fill-in-the-middle
  (data.fim_rate) draws: the PSM prompt BOS <|fim_prefix|> prefix <|fim_suffix|> suffix
  <|fim_middle|>, continued until the document's EOS."""
  out = generate(cfg, params, [infill_prompt(tokenizer, prefix, suffix)],
                 max_new_tokens=max_new_tokens, rng=rng, filter_fn=filter_fn,
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, truncate=truncate)
  return tokenizer.decode(out.tokens[0])


# --- beam search ---------------------------------------------------------------------------

@dataclasses.dataclass
class Beams:
  tokens: list[list[int]]  # each prompt's best continuation, through EOS if it ended there
  scores: list[float]  # its log-probability / length ** length_penalty


def beam_search(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, num_beams: int,
                max_new_tokens: int, eos_id: int | None = None, length_penalty: float = 1.0,
                pad_id: int = 0, truncate: bool = False) -> Beams:
  """The num_beams most likely continuations are extended token by token (one
  jax.lax.while_loop); a beam that draws eos_id becomes a finished hypothesis, scored by its
  log-probability over length ** length_penalty, as are the beams alive at max_new_tokens.
  The search ends early once no alive beam can beat the worst of num_beams finished ones."""
  require(isinstance(num_beams, (int, np.integer)) and num_beams >= 1, 'num_beams', num_beams,
          'must be an integer >= 1 (1 is greedy)')
  require(length_penalty >= 0, 'length_penalty', length_penalty,
          'must be >= 0 (0 ranks by log-probability, 1 by its mean per token)')
  prompts = fit_prompts(cfg, prompts, max_new_tokens, truncate)
  tokens_BxT, lengths_B = left_pad(prompts, pad_id)
  logits_BxV, cache = prefill(cfg, params, tokens_BxT, lengths_B,
                              max_len=tokens_BxT.shape[1] + max_new_tokens)
  seqs_BxN, lengths_B, scores_B = jax.device_get(_beam_loop(
      cfg, params, logits_BxV, cache, num_beams=int(num_beams),
      max_new_tokens=max_new_tokens, eos_id=-1 if eos_id is None else eos_id,
      length_penalty=float(length_penalty)))
  return Beams([seqs_BxN[b, :n].tolist() for b, n in enumerate(lengths_B)],
               [float(s) for s in scores_B])


@decoding_jit(rows=lambda cfg, params, logits_BxV, *args, num_beams, **kwargs:
              logits_BxV.shape[0] * num_beams,
              static_argnames=('cfg', 'num_beams', 'max_new_tokens', 'eos_id', 'length_penalty'))
def _beam_loop(cfg, params, logits_BxV, cache, *, num_beams, max_new_tokens, eos_id,
               length_penalty):
  batch = logits_BxV.shape[0]
  k, n = num_beams, max_new_tokens
  d = models.decoding(cfg)
  params = d.prepare(params, batch * k)
  vocab = logits_BxV.shape[-1]
  cache = d.expand(cache, k)  # row b * k + j: beam j of prompt b
  logits_BKxV = jnp.repeat(logits_BxV, k, axis=0)
  neg_inf = jnp.float32(-jnp.inf)
  norm = lambda logp, length: logp / length.astype(jnp.float32) ** length_penalty

  def cond(carry):
    i, _, _, _, alive_logp_BxK, _, fin_score_BxK, _ = carry
    # An alive beam's log-probability only falls, and the longest length divides it least.
    best_alive_B = jnp.max(norm(alive_logp_BxK, jnp.int32(n)), axis=-1)
    return (i < n) & ~jnp.all(jnp.min(fin_score_BxK, axis=-1) >= best_alive_B)

  def body(carry):
    i, logits_BKxV, cache, alive_BxKxN, alive_logp_BxK, fin_BxKxN, fin_score_BxK, fin_len_BxK = (
        carry)
    logp_BxKxV = jax.nn.log_softmax(logits_BKxV.reshape(batch, k, vocab))
    cand_BxKV = (alive_logp_BxK[:, :, None] + logp_BxKxV).reshape(batch, k * vocab)
    cand_logp_BxC, cand_C = jax.lax.top_k(cand_BxKV, min(2 * k, k * vocab))
    beam_BxC, token_BxC = cand_C // vocab, (cand_C % vocab).astype(jnp.int32)
    seqs_BxCxN = jnp.take_along_axis(alive_BxKxN, beam_BxC[:, :, None], axis=1)
    seqs_BxCxN = seqs_BxCxN.at[:, :, i].set(token_BxC)
    ends_BxC = (token_BxC == eos_id) | (i == n - 1)
    # Finished hypotheses: the best num_beams of the old ones and those that end now.
    new_score_BxC = jnp.where(ends_BxC, norm(cand_logp_BxC, i + 1), neg_inf)
    pool_score = jnp.concatenate([fin_score_BxK, new_score_BxC], axis=1)
    pool_seqs = jnp.concatenate([fin_BxKxN, seqs_BxCxN], axis=1)
    pool_len = jnp.concatenate([fin_len_BxK, jnp.full_like(token_BxC, i + 1)], axis=1)
    fin_score_BxK, best = jax.lax.top_k(pool_score, k)
    fin_BxKxN = jnp.take_along_axis(pool_seqs, best[:, :, None], axis=1)
    fin_len_BxK = jnp.take_along_axis(pool_len, best, axis=1)
    # Alive beams: the best num_beams candidates that did not draw EOS.
    alive_logp_BxK, keep = jax.lax.top_k(jnp.where(ends_BxC, neg_inf, cand_logp_BxC), k)
    alive_BxKxN = jnp.take_along_axis(seqs_BxCxN, keep[:, :, None], axis=1)
    cache = d.reorder(cache, jnp.take_along_axis(beam_BxC, keep, axis=1))
    token_BK = jnp.take_along_axis(token_BxC, keep, axis=1).reshape(-1)
    logits_BKxV, cache = d.decode_step(params, token_BK, cache)
    return (i + 1, logits_BKxV, cache, alive_BxKxN, alive_logp_BxK, fin_BxKxN, fin_score_BxK,
            fin_len_BxK)

  first_logp_BxK = jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None].repeat(batch, 0)
  carry = (jnp.int32(0), logits_BKxV, cache, jnp.zeros((batch, k, n), jnp.int32),
           first_logp_BxK, jnp.zeros((batch, k, n), jnp.int32),
           jnp.full((batch, k), neg_inf), jnp.zeros((batch, k), jnp.int32))
  carry = jax.lax.while_loop(cond, body, carry)
  fin_BxKxN, fin_score_BxK, fin_len_BxK = carry[5:]
  return replicated((fin_BxKxN[:, 0], fin_len_BxK[:, 0], fin_score_BxK[:, 0]))
