"""Filters against numpy references, draws against the filtered softmax (chi-square), generate
against full forward passes, beam search against greedy and exhaustive search, streaming."""
from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lm
from lm import models, sampling
from lm.config import ConfigError
from lm.models import DecoderConfig
from lm.models import decoder
from lm.models.layers import kv_cache
from lm.tokenizers.tokenizer import StreamDecoder, byte_tokenizer

CFG = DecoderConfig(vocab_size=269, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64)
LLAMA = dataclasses.replace(CFG, **{'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu',
                       'use_bias': False, 'num_kv_heads': 2, 'window': 6,
                       'layer_pattern': 'LG'})


def params_of(cfg: DecoderConfig, seed: int = 0, scale: float = 1.0):
  """Random weights, scaled up so that the next-token distributions are far from uniform."""
  boxed = models.build(cfg).init(jax.random.PRNGKey(seed),
                                 jnp.zeros((1, 8), jnp.int32))['params']
  return jax.tree.map(lambda x: x * scale, nn.meta.unbox(boxed))


# --- filters against numpy -----------------------------------------------------------------

def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_top_k(logits, k):
  kth = np.sort(logits, -1)[:, ::-1][:, min(k, logits.shape[-1]) - 1:][:, :1]
  return np.where(logits >= kth, logits, -np.inf)


def np_top_p(logits, p):
  if p == 1.0:  # the rule: p = 1 keeps every token, however little mass rounding leaves it
    return logits
  out = np.full_like(logits, -np.inf)
  for b, row in enumerate(logits):
    probs = np_softmax(row)
    order = np.argsort(-probs, kind='stable')
    mass, kept = 0.0, []
    for i in order:
      if mass >= p:
        break
      kept.append(i)
      mass += probs[i]
    last = probs[kept[-1]]
    keep = probs >= last - 1e-7  # ties with the last kept token stay
    out[b, keep] = row[keep]
  return out


def np_min_p(logits, alpha):
  probs = np_softmax(logits)
  return np.where(probs >= alpha * probs.max(-1, keepdims=True), logits, -np.inf)


LOGITS = np.log(np.array([[0.4, 0.3, 0.2, 0.1, 1e-9],   # distinct
                          [0.3, 0.2, 0.2, 0.2, 0.1],    # ties at the 2nd..4th value
                          [1.0, 1e-12, 1e-12, 1e-12, 1e-12],  # one token holds all the mass
                          [0.25, 0.25, 0.25, 0.25, 1e-9]]), dtype=np.float32)
RANDOM = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32) * 3


@pytest.mark.parametrize('k', [1, 2, 3, 5, 7, 1000])
def test_top_k_equals_numpy_ties_at_the_kth_value_all_kept(k):
  for logits in (LOGITS, RANDOM):
    np.testing.assert_array_equal(sampling.top_k(k)(jnp.asarray(logits)), np_top_k(logits, k))
  if k == 2:  # row 1: 0.3 then three tied at 0.2: all four kept
    assert np.isfinite(np.asarray(sampling.top_k(2)(jnp.asarray(LOGITS)))[1]).sum() == 4


@pytest.mark.parametrize('p', [0.05, 0.35, 0.55, 0.8, 0.95, 0.9985, 1.0])  # none on a row's
# exact cumulative mass, where float32 and float64 round differently
@pytest.mark.parametrize('candidates', [64, 3], ids=['nucleus-in-candidates', 'bisection-too'])
def test_top_p_equals_numpy_boundary_token_and_its_ties_kept(p, candidates, monkeypatch):
  monkeypatch.setattr(sampling, 'TOP_P_CANDIDATES', candidates)
  for logits in (LOGITS, RANDOM):
    np.testing.assert_array_equal(sampling.top_p(p)(jnp.asarray(logits)), np_top_p(logits, p))
  kept = np.isfinite(np.asarray(sampling.top_p(p)(jnp.asarray(LOGITS))))
  assert kept[2].sum() == (5 if p == 1.0 else 1)  # one token holds all the mass
  if p == 0.35:  # row 0: 0.4 reaches p alone; row 1: the 0.2 that reaches p, and its ties
    assert kept[0].tolist() == [True, False, False, False, False]
    assert kept[1].tolist() == [True, True, True, True, False]
  if p == 0.55:  # row 0: 0.4 < 0.55, so the 0.3 that reaches 0.7 is kept too
    assert kept[0].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize('alpha', [0.0, 0.1, 0.5, 0.75, 0.99])
def test_min_p_equals_numpy(alpha):
  for logits in (LOGITS, RANDOM):
    np.testing.assert_array_equal(sampling.min_p(alpha)(jnp.asarray(logits)),
                                  np_min_p(logits, alpha))


def test_temperature_and_greedy():
  np.testing.assert_allclose(sampling.temperature(0.5)(jnp.asarray(RANDOM)), RANDOM / 0.5,
                             rtol=1e-6)
  greedy = np.asarray(sampling.temperature(0)(jnp.asarray(LOGITS)))
  assert np.isfinite(greedy).sum(-1).tolist() == [1, 1, 1, 4]  # ties at the top all kept


def test_greedy_takes_the_first_top_token_and_a_draw_never_passes_the_last_possible(monkeypatch):
  logits = np.array([[1, 3, 3, -np.inf], [-np.inf, -np.inf, 2, 2], [0, 0, 0, 0],
                     [-np.inf, 5, -np.inf, -np.inf]], np.float32)
  np.testing.assert_array_equal(sampling.first_argmax(jnp.asarray(logits)), [1, 2, 0, 1])
  np.testing.assert_array_equal(sampling.first_argmax(jnp.asarray(RANDOM)), RANDOM.argmax(-1))
  # u * total rounding up to the total: the last token of nonzero probability, not past it
  monkeypatch.setattr(jax.random, 'uniform', lambda key, shape: jnp.ones(shape))
  np.testing.assert_array_equal(sampling.draw(jnp.asarray(logits), jax.random.PRNGKey(0)),
                                [2, 3, 3, 1])


def test_chained_filters_apply_in_order():
  f = sampling.chain(sampling.temperature(2.0), sampling.top_k(3), sampling.min_p(0.9))
  expected = np_min_p(np_top_k(RANDOM / 2.0, 3), 0.9)
  np.testing.assert_allclose(f(jnp.asarray(RANDOM)), expected, rtol=1e-6)


@pytest.mark.parametrize('make, value, message', [
    (sampling.temperature, -0.1, r'temperature=-0\.1: must be >= 0'),
    (sampling.top_k, 0, r'top_k=0: must be an integer >= 1'),
    (sampling.top_p, 0.0, r'top_p=0\.0: must be in \(0, 1\]'),
    (sampling.top_p, 1.5, r'top_p=1\.5: must be in \(0, 1\]'),
    (sampling.min_p, 1.0, r'min_p=1\.0: must be in \[0, 1\)'),
    (sampling.min_p, -0.5, r'min_p=-0\.5: must be in \[0, 1\)'),
])
def test_bad_filter_arguments(make, value, message):
  with pytest.raises(ConfigError, match=message):
    make(value)


@pytest.mark.parametrize('name, make', [
    ('temperature 0.7', lambda: sampling.temperature(0.7)),
    ('top-k 5', lambda: sampling.top_k(5)),
    ('top-p 0.8', lambda: sampling.top_p(0.8)),
    ('min-p 0.2', lambda: sampling.min_p(0.2)),
])
def test_draws_follow_the_filtered_softmax_chi_square(name, make):
  """sampling.pick: the filter, then the inverse-CDF draw."""
  logits_V = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05], np.float32))
  filtered = np.asarray(make()(jnp.asarray(logits_V[None])))[0]
  expected = np_softmax(np.where(np.isfinite(filtered), filtered, -1e30))
  n = 20000
  draws = sampling.pick(make(), jnp.tile(logits_V, (n, 1)), jax.random.PRNGKey(0))
  counts = np.bincount(np.asarray(draws), minlength=7)
  assert counts[expected == 0].sum() == 0  # nothing filtered out is ever drawn
  support = expected > 0
  chi2 = ((counts[support] - n * expected[support]) ** 2 / (n * expected[support])).sum()
  # 99.9% quantile of chi-square with up to 6 degrees of freedom is 22.5. The unfiltered
  # softmax fails it whenever the filter removes or reshapes mass:
  assert chi2 < 22.5, (name, chi2)
  unfiltered = np_softmax(logits_V)
  wrong = ((counts - n * unfiltered) ** 2 / (n * unfiltered)).sum()
  assert wrong > 100, (name, wrong)


# --- generate ------------------------------------------------------------------------------

def argmax_continuation(cfg, params, prompt, n):
  """Greedy decoding with a full forward pass per token: the reference. The sequence sits at
  the start of a fixed buffer (one compile); being causal, the model ignores what follows."""
  apply = jax.jit(models.build(cfg).apply)
  seq = list(prompt)
  for _ in range(n):
    buffer = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
    seq.append(int(np.argmax(apply({'params': params}, buffer)[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize('cfg', [CFG, LLAMA], ids=['gpt2', 'llama-local-global'])
def test_greedy_generate_equals_full_forward_argmax_and_rows_equal_each_row_alone(cfg):
  params = params_of(cfg, scale=3.0)
  prompts = [[256, 5, 6, 7, 8, 9, 10, 11, 12], [256, 9], [256, 40, 41, 42, 43]]
  out = sampling.generate(cfg, params, prompts, max_new_tokens=12)
  for prompt, got in zip(prompts, out.tokens):
    assert got == argmax_continuation(cfg, params, prompt, 12)
  key = jax.random.PRNGKey(3)  # also sampled: each row as it is drawn alone, with the same key
  together = sampling.generate(cfg, params, prompts, max_new_tokens=12, rng=key,
                               filter_fn=sampling.temperature(1.0))
  for b, prompt in enumerate(prompts):
    alone = sampling.generate(cfg, params, [prompt] * 3, max_new_tokens=12, rng=key,
                              filter_fn=sampling.temperature(1.0))
    assert together.tokens[b] == alone.tokens[b]


@pytest.mark.cpu_only
@pytest.mark.parametrize('cfg', [CFG, LLAMA, dataclasses.replace(LLAMA, scan_layers=True)],
                         ids=['gpt2', 'llama', 'llama-scanned'])
def test_decoding_params_give_the_models_logits(cfg):
  """The decode loops' layout on CPU: a tied head as a [D, V] copy, and for one row the MLP
  down kernels transposed; the same logits through prefill and decode steps."""
  params = params_of(cfg, scale=3.0)
  leaves, tree = jax.tree.flatten(params)  # biases and norms away from their zeros and ones
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(jax.random.PRNGKey(i), x.shape)
                                     for i, x in enumerate(leaves)])
  tokens_BxT = jnp.asarray([[256, 5, 6, 7, 8, 9], [256, 9, 9, 1, 2, 3]])
  one_cfg, one = decoder.decoding_params(cfg, params, rows=1)
  assert cfg.tie_embeddings and not one_cfg.tie_embeddings  # the tests run on CPU
  np.testing.assert_array_equal(one['head']['kernel'], params['embed']['embedding'].T)
  layer = one['layers']['block_0'] if cfg.scan_layers else one['block_0']
  kernel = (params['layers']['block_0'] if cfg.scan_layers else params['block_0'])['mlp'][
      'down']['kernel']
  assert 'kernel' not in layer['mlp']['down']
  np.testing.assert_array_equal(layer['mlp']['down']['kernel_T'], jnp.swapaxes(kernel, -1, -2))
  full_BxTxV = models.build(cfg).apply({'params': params}, tokens_BxT)
  for b in range(2):  # one row: a prefill of 3 tokens, then decode steps
    logits_1x3xV, cache = decoder.prefill(one_cfg, one, tokens_BxT[b:b + 1, :3], 8)
    steps = [logits_1x3xV[:, -1]]
    for t in range(3, 5):
      logits_1xV, cache = decoder.decode_step(one_cfg, one, tokens_BxT[b:b + 1, t], cache)
      steps.append(logits_1xV)
    np.testing.assert_allclose(jnp.stack(steps, 1)[0], full_BxTxV[b, 2:5], atol=1e-4)
  many_cfg, many = decoder.decoding_params(cfg, params, rows=2)
  assert many_cfg == one_cfg
  assert jax.tree.map(jnp.shape, many) == jax.tree.map(
      jnp.shape, {**params, 'head': {'kernel': params['embed']['embedding'].T}})
  untied_cfg = dataclasses.replace(cfg, tie_embeddings=False)
  same_cfg, same_params = decoder.decoding_params(untied_cfg, params, rows=2)
  assert same_cfg is untied_cfg and same_params is params


@pytest.mark.cpu_only
def test_decoding_loops_compile_with_ynnpack_matmuls_on_cpu_unless_the_user_chose(monkeypatch):
  ynn = lambda lowered: '__ynn_fusion' in lowered.compile().as_text()
  params = params_of(CFG)
  tokens, lengths = jnp.zeros((2, 16), jnp.int32), jnp.full((2,), 16, jnp.int32)
  logits, state = sampling.prefill(CFG, params, tokens, lengths, max_len=20)
  loop = lambda: sampling._sample_loop.lower(
      CFG, params, logits, state, jax.random.PRNGKey(0), max_new_tokens=4,
      filter_fn=sampling.GREEDY, eos_id=-1, return_logprobs=False)
  assert jax.default_backend() == 'cpu' and ynn(loop())
  # the prefill's many rows take the training matmuls: it compiles apart from the loop
  assert not ynn(sampling.prefill.lower(CFG, params, tokens, lengths, max_len=20))
  # and so does a loop over more than YNN_MAX_ROWS rows (Eigen's are faster at 8)
  logits8, state8 = sampling.prefill(CFG, params, jnp.zeros((8, 16), jnp.int32),
                                     jnp.full((8,), 16, jnp.int32), max_len=20)
  assert not ynn(sampling._sample_loop.lower(
      CFG, params, logits8, state8, jax.random.PRNGKey(0), max_new_tokens=4,
      filter_fn=sampling.GREEDY, eos_id=-1, return_logprobs=False))
  matmul = sampling.decoding_jit()(lambda x_BxD, w_DxF: x_BxD @ w_DxF)
  x_BxD, w_DxF = jnp.ones((8, 16)), jnp.ones((16, 32))
  assert ynn(matmul.lower(x_BxD, w_DxF))
  monkeypatch.setattr(lm.backend, 'USER_CHOSE_CPU_MATMULS', True)  # XLA_FLAGS named a choice
  assert not ynn(matmul.lower(x_BxD, w_DxF)) and not ynn(loop())
  np.testing.assert_array_equal(matmul(x_BxD, w_DxF), np.full((8, 32), 16.0))


def test_rows_stop_at_their_eos_and_logprobs_are_the_models():
  params = params_of(CFG, scale=3.0)
  prompts = [[256, 1, 2], [256, 7]]
  free = sampling.generate(CFG, params, prompts, max_new_tokens=10)
  eos = free.tokens[0][3]  # row 0 draws it 4th; row 1 may draw it later or never
  out = sampling.generate(CFG, params, prompts, max_new_tokens=10, eos_id=eos,
                         return_logprobs=True)
  assert free.logprobs is None  # only on request
  assert out.tokens[0] == free.tokens[0][:4]
  stop = free.tokens[1].index(eos) + 1 if eos in free.tokens[1] else 10
  assert out.tokens[1] == free.tokens[1][:stop]
  apply = models.build(CFG).apply
  for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
    logits = apply({'params': params}, jnp.asarray([prompt + tokens]))[0, len(prompt) - 1:-1]
    expected = jax.nn.log_softmax(logits)[jnp.arange(len(tokens)), jnp.asarray(tokens)]
    np.testing.assert_allclose(logprobs, expected, atol=1e-4)


def test_sampling_is_deterministic_for_a_key():
  params = params_of(CFG)
  run = lambda seed: sampling.generate(CFG, params, [[256, 1, 2]], max_new_tokens=20,
                                       rng=jax.random.PRNGKey(seed),
                                       filter_fn=sampling.temperature(1.0)).tokens
  assert run(0) == run(0) and run(0) != run(1) and len(run(0)[0]) == 20


def test_bad_prompts():
  params = params_of(CFG)
  with pytest.raises(ConfigError, match=r'prompts\[1\]=\[\]: is empty: give at least one token'):
    sampling.generate(CFG, params, [[1], []], max_new_tokens=4)
  long = list(range(60))
  with pytest.raises(ConfigError, match=r"prompts\[0\]='60 tokens': with max_new_tokens=8 it "
                                        r'exceeds the model context 64: .* or truncate'):
    sampling.generate(CFG, params, [long], max_new_tokens=8)
  out = sampling.generate(CFG, params, [long], max_new_tokens=8, truncate=True)
  assert out.tokens[0] == sampling.generate(CFG, params, [long[-56:]], max_new_tokens=8).tokens[0]
  with pytest.raises(ConfigError, match=r'max_new_tokens=64: must be in \[1, the model context'):
    sampling.generate(CFG, params, [[1]], max_new_tokens=64)
  with pytest.raises(ConfigError, match=r'prompts\[0\]=\[300\]: ids outside the vocabulary'):
    sampling.generate(CFG, params, [[300]], max_new_tokens=4)
  with pytest.raises(ConfigError, match=r'num_beams=0: must be an integer >= 1'):
    sampling.beam_search(CFG, params, [[1]], num_beams=0, max_new_tokens=4)


def test_stream_yields_the_text_of_the_tokens_generate_draws():
  params = params_of(CFG)
  tok = byte_tokenizer()
  prompt = [tok.bos_id, *tok.encode('def ')]
  key = jax.random.PRNGKey(7)
  pieces = list(sampling.stream(CFG, params, tok, prompt, max_new_tokens=30, rng=key,
                                filter_fn=sampling.temperature(1.0)))
  tokens = sampling.generate(CFG, params, [prompt], max_new_tokens=30, rng=key,
                             filter_fn=sampling.temperature(1.0), eos_id=tok.eos_id).tokens[0]
  if tokens and tokens[-1] == tok.eos_id:
    tokens = tokens[:-1]
  decoder = StreamDecoder(tok)
  assert ''.join(pieces) == decoder.feed(tokens) + decoder.flush()
  assert len(pieces) > 1  # it streams: text comes out a piece at a time


# --- beam search ---------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [CFG, LLAMA], ids=['gpt2', 'llama-local-global'])
def test_one_beam_is_greedy(cfg):
  params = params_of(cfg, scale=3.0)
  prompts = [[256, 5, 6, 7], [256, 9]]
  beams = sampling.beam_search(cfg, params, prompts, num_beams=1, max_new_tokens=10)
  assert beams.tokens == sampling.generate(cfg, params, prompts, max_new_tokens=10).tokens


@pytest.mark.parametrize('cfg', [CFG, LLAMA, dataclasses.replace(LLAMA, scan_layers=True)],
                         ids=['gpt2', 'llama-local-global', 'llama-scanned'])
def test_reordering_beams_by_their_rows_table_equals_moving_the_rows(cfg, monkeypatch):
  # The reference moves each beam's keys and values into its row (select_rows), as beam search
  # did before reorder_beams. Blocks of 4 slots: the cache of 16 is read in 1 to 4 blocks; the
  # window of 6 wraps; two prompts of 3 beams, left-padded.
  monkeypatch.setattr(kv_cache, 'CACHE_BLOCK', 4)
  params = params_of(cfg, scale=2.0)
  prompts, beams, rng = 2, 3, np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (prompts, 4)), jnp.int32)
  _, cache = decoder.prefill(cfg, params, tokens, max_len=16, lengths_B=jnp.array([4, 2]))
  moved = decoder.select_rows(cache, jnp.repeat(jnp.arange(prompts), beams))
  tabled = decoder.reorder_beams(moved, jnp.broadcast_to(jnp.arange(beams), (prompts, beams)))
  step = jax.jit(lambda token, cache: decoder.decode_step(cfg, params, token, cache))
  for _ in range(12):
    parent_PxR = jnp.asarray(rng.integers(0, beams, (prompts, beams)), jnp.int32)
    rows = (jnp.arange(prompts)[:, None] * beams + parent_PxR).reshape(-1)
    moved = decoder.select_rows(moved, rows)
    tabled = decoder.reorder_beams(tabled, parent_PxR)
    token = jnp.asarray(rng.integers(0, cfg.vocab_size, prompts * beams), jnp.int32)
    want, moved = step(token, moved)
    got, tabled = step(token, tabled)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_beam_scores_are_the_full_forward_scores_of_their_tokens():
  params = params_of(LLAMA, scale=2.0)
  apply = jax.jit(models.build(LLAMA).apply)
  prompts = [[256, 5, 6, 7, 8], [256, 9]]
  beams = sampling.beam_search(LLAMA, params, prompts, num_beams=4, max_new_tokens=12,
                               length_penalty=1.0)
  for prompt, seq, got in zip(prompts, beams.tokens, beams.scores):
    logits = apply({'params': params}, jnp.asarray([prompt + seq]))[0]
    logp = jax.nn.log_softmax(logits[len(prompt) - 1:-1])
    want = float(sum(logp[i, t] for i, t in enumerate(seq))) / len(seq)
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_beam_search_finds_the_exhaustive_best_on_a_tiny_vocabulary(length_penalty):
  cfg = dataclasses.replace(CFG, **{'vocab_size': 4})
  params = params_of(cfg, seed=1, scale=2.0)
  apply = jax.jit(models.build(cfg).apply)
  prompt, eos, n = [0, 1], 3, 3

  def score(seq):
    logits = apply({'params': params}, jnp.asarray([prompt + list(seq)]))[0]
    logp = jax.nn.log_softmax(logits[len(prompt) - 1:-1])
    total = float(sum(logp[i, t] for i, t in enumerate(seq)))
    return total / len(seq) ** length_penalty

  # Every hypothesis: a sequence that ends at its first EOS, or runs to n tokens.
  hypotheses = {seq[:seq.index(eos) + 1] if eos in seq else seq
                for seq in itertools.product(range(4), repeat=n)}
  best = max(hypotheses, key=score)
  beams = sampling.beam_search(cfg, params, [prompt, [2]], num_beams=16, max_new_tokens=n,
                               eos_id=eos, length_penalty=length_penalty)
  assert tuple(beams.tokens[0]) == best
  np.testing.assert_allclose(beams.scores[0], score(best), rtol=1e-5)
