"""Mamba-2 (layer kind D): the chunked SSD algorithm against a numpy loop, transformers'
Mamba2ForCausalLM with random weights (its PyTorch path), the decoding interface, packed rows,
hybrids and bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import hf, models, sampling
from lm.config import ConfigError
from lm.models import decoder
from lm.models.layers import common, mamba2
from tests.conftest import load_config
from tests.test_ssm import init, tiny


def numpy_ssd(x, dt, A, B, C, h, segment_ids):
  """The multi-head recurrence, one step at a time, in float64; a new segment starts from 0."""
  heads, groups = x.shape[2], B.shape[2]
  h = h.astype(np.float64)
  ys = []
  for t in range(x.shape[1]):
    if t:
      h = h * (segment_ids[:, t] == segment_ids[:, t - 1])[:, None, None, None]
    Bh, Ch = (np.repeat(v[:, t], heads // groups, axis=1) for v in (B, C))
    h = (np.exp(dt[:, t] * A)[..., None, None] * h
         + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, :, None, :])
    ys.append(np.einsum('bhpn,bhn->bhp', h, Ch))
  return np.stack(ys, 1), h


def test_ssd_equals_a_numpy_loop_across_chunks_and_segments():
  rng = np.random.default_rng(0)
  batch, length, heads, p, groups, n = 2, 11, 4, 3, 2, 5
  x = rng.standard_normal((batch, length, heads, p)).astype(np.float32)
  dt = np.log1p(np.exp(rng.standard_normal((batch, length, heads)))).astype(np.float32)
  A = -np.exp(rng.standard_normal(heads)).astype(np.float32)
  B, C = (rng.standard_normal((batch, length, groups, n)).astype(np.float32) for _ in range(2))
  h0 = rng.standard_normal((batch, heads, p, n)).astype(np.float32)
  segments = np.array([[0] * 4 + [1] * 5 + [2] * 2, [0] * 11])
  want_y, want_h = numpy_ssd(x, dt, A, B, C, h0, segments)
  for chunk in (3, 4, 16):  # 3 and 4 do not divide 11: padded with steps that keep the state
    y, h = mamba2.ssd(*map(jnp.asarray, (x, dt, A, B, C, h0)), chunk=chunk,
                      segment_ids_BxT=jnp.asarray(segments))
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), want_h, rtol=1e-5, atol=1e-5)
  y1, h1 = mamba2.ssd_step(*map(jnp.asarray, (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0)))
  y_all, h_all = mamba2.ssd(*map(jnp.asarray, (x[:, :1], dt[:, :1], A, B[:, :1], C[:, :1], h0)))
  np.testing.assert_allclose(y1, y_all[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h1, h_all, rtol=1e-5, atol=1e-6)


torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
TOKENS = np.random.default_rng(0).integers(0, 101, (2, 19))


def hf_mamba2(tied: bool, bias: bool, groups: int):
  config = transformers.Mamba2Config(
      vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
      head_dim=16, num_heads=4, n_groups=groups, conv_kernel=4, use_bias=bias,
      use_conv_bias=True, chunk_size=8, tie_word_embeddings=tied)
  model = transformers.Mamba2ForCausalLM(config)
  torch.manual_seed(0)
  with torch.no_grad():  # non-trivial D, dt bias, A_log and norm: every tensor moves the logits
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize('tied,bias,groups', [(False, False, 2), (True, True, 1)])
def test_mamba2_matches_transformers_logits_save_and_greedy_generate(tied, bias, groups,
                                                                    tmp_path):
  theirs = hf_mamba2(tied, bias, groups)
  theirs.save_pretrained(tmp_path / 'hf')
  cfg, params = hf.load(tmp_path / 'hf')
  assert (cfg.layer_kinds, cfg.tie_embeddings, cfg.use_bias, cfg.ngroups, cfg.ssm_head_dim,
          cfg.scan_chunk) == ('DD', tied, bias, groups, 16, 8)
  with torch.no_grad():
    expected = theirs(torch.tensor(TOKENS)).logits.numpy()
  assert np.abs(expected).max() > 1.0
  logits = models.build(cfg).apply({'params': params}, jnp.asarray(TOKENS))  # 19: 3 chunks
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
  hf.save(cfg, params, tmp_path / 'ours')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
  assert type(reloaded).__name__ == 'Mamba2ForCausalLM'
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(TOKENS)).logits.numpy(), expected,
                               atol=1e-4, rtol=0)
    theirs.generation_config.eos_token_id = None  # id 0 is an ordinary token here
    want = theirs.generate(torch.tensor(TOKENS[:1, :5]), max_new_tokens=12,
                           do_sample=False)[0, 5:].tolist()
  assert len(want) == 12
  assert sampling.generate(cfg, params, [TOKENS[0, :5]], max_new_tokens=12).tokens[0] == want


# Prefill and decode steps against the full forward: tests/test_ssm.py, patterns D and DG.


def test_left_padded_prompts_and_beams_on_a_mamba2_hybrid():
  cfg = tiny('DG')
  params = init(cfg)
  prompts = [[5, 9, 2, 7, 1, 3, 8], [4], [11, 12, 13]]
  batch = sampling.generate(cfg, params, prompts, max_new_tokens=6).tokens
  for prompt, row in zip(prompts, batch):
    assert sampling.generate(cfg, params, [prompt], max_new_tokens=6).tokens[0] == row
  assert sampling.beam_search(cfg, params, prompts, num_beams=1, max_new_tokens=6).tokens == batch


def test_packed_rows_equal_each_segment_run_alone():
  cfg = tiny('DG', positions='rope', num_layers=2, scan_chunk=4)
  params = init(cfg)
  apply = jax.jit(models.build(cfg).apply)
  lengths = [5, 1, 6]
  docs = [jax.random.randint(jax.random.PRNGKey(i), (n,), 0, 61) for i, n in enumerate(lengths)]
  tokens = jnp.concatenate(docs)[None]
  segment_ids = jnp.concatenate([jnp.full((n,), i) for i, n in enumerate(lengths)])[None]
  positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
  packed = apply({'params': params}, tokens, segment_ids=segment_ids, positions=positions)
  start = 0
  for doc in docs:
    np.testing.assert_allclose(packed[:, start:start + len(doc)],
                               apply({'params': params}, doc[None]), atol=1e-5, rtol=1e-5)
    start += len(doc)


def test_flops_no_decay_tags_and_state_size():
  cfg = tiny('D', num_layers=1, d_model=32, state_size=4, vocab_size=61, scan_chunk=8)
  inner, heads, conv_dim = 64, 4, 64 + 2 * 2 * 4
  matmul = 32 * (2 * inner + 2 * 2 * 4 + heads) + inner * 32
  scan = 3 * (2 * 4 * conv_dim + heads * (2 * 8 * (4 + 16) + 4 * 16 * 4))
  assert decoder.train_flops_per_token(cfg, 128) == 6 * (matmul + 32 * 61) + scan
  decays = common.decays(models.abstract_params(models.build(cfg)))
  assert sorted(k for k, v in decays.items() if not v) == sorted(
      ['block_0/mamba2/' + k for k in ('A_log', 'D', 'conv_bias', 'dt_bias', 'norm_scale')]
      + ['block_0/mixer_norm/scale', 'final_norm/scale'])
  _, state = models.decoding(cfg).prefill(init(cfg), jnp.ones((1, 16), jnp.int32), None, 10_000)
  assert [x.shape for x in jax.tree.leaves(state['layers'])] == [(1, inner, 4), (1, 3, conv_dim)]


@pytest.mark.parametrize('overrides,message', [
    (dict(ssm_head_dim=48), r'model\.ssm_head_dim=48: Mamba-2 splits its inner width'),
    (dict(ngroups=3), r'model\.ngroups=3: the groups share B and C among the \d+ heads'),
    (dict(ngroups=0), r'model\.ngroups=0: must be >= 1'),
])
def test_bad_mamba2_options(overrides, message):
  from lm import config as config_lib
  c = load_config()
  c.model.update(layer_pattern='DG', **overrides)
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(c, vocab_size=259, device_count=1)
  c = load_config('encoder')
  c.model.ngroups = 2
  with pytest.raises(ConfigError, match=r"model\.ngroups=2: a key of the decoder family"):
    config_lib.parse(c, vocab_size=259, device_count=1)
