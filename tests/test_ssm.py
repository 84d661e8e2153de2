"""The scan layers (Mamba's selective SSM, S4D) and hybrid decoders: numpy references,
transformers' MambaForCausalLM with random weights, the decoding interface and bad input."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import hf, models, sampling
from lm.config import ConfigError
from lm.models import DecoderConfig
from lm.models import decoder
from lm.models.layers import common, ssm
from tests.conftest import load_config

SCANS = ('sequential', 'parallel', 'chunked')


def scan_inputs(batch=2, length=12, inner=5, n=3, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((batch, length, inner)).astype(np.float32)
  dt = np.log1p(np.exp(rng.standard_normal((batch, length, inner)))).astype(np.float32)
  A = -np.exp(rng.standard_normal((inner, n))).astype(np.float32)
  B, C = (rng.standard_normal((batch, length, n)).astype(np.float32) for _ in range(2))
  h0 = rng.standard_normal((batch, inner, n)).astype(np.float32)
  return u, dt, A, B, C, h0


def numpy_selective_scan(u, dt, A, B, C, h):
  """The recurrence, one step at a time, in float64."""
  ys = []
  h = h.astype(np.float64)
  for t in range(u.shape[1]):
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
    ys.append(np.einsum('bin,bn->bi', h, C[:, t]))
  return np.stack(ys, 1), h


@pytest.mark.parametrize('scan', SCANS)
def test_selective_scan_equals_a_numpy_loop(scan):
  args = scan_inputs()
  want_y, want_h = numpy_selective_scan(*args)
  for chunk in (4, 5):  # 5 does not divide 12: padded with steps that keep the state
    y, h = ssm.selective_scan(*map(jnp.asarray, args), scan=scan, chunk=chunk)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), want_h, rtol=1e-5, atol=1e-5)


def test_the_three_scans_have_equal_outputs_and_gradients():
  u, dt, A, B, C, h0 = map(jnp.asarray, scan_inputs(length=16))
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 5)), jnp.float32)

  def loss(scan, *args):
    y, h = ssm.selective_scan(*args, scan=scan, chunk=4)
    return jnp.sum(y * weights) + jnp.sum(h ** 2)
  grads = {scan: jax.grad(loss, argnums=(1, 2, 3, 4, 5, 6))(scan, u, dt, A, B, C, h0)
           for scan in SCANS}
  values = {scan: loss(scan, u, dt, A, B, C, h0) for scan in SCANS}
  for scan in ('parallel', 'chunked'):
    np.testing.assert_allclose(values[scan], values['sequential'], rtol=1e-5)
    for g, want in zip(grads[scan], grads['sequential']):
      np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_causal_conv_equals_numpy_and_continues_from_its_window():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3)).astype(np.float32)
  kernel = rng.standard_normal((4, 3)).astype(np.float32)
  padded = np.concatenate([np.zeros((2, 3, 3), np.float32), x], 1)
  want = np.stack([sum(padded[:, t + k] * kernel[k] for k in range(4)) for t in range(7)], 1)
  y, window = ssm.causal_conv(jnp.asarray(x), jnp.asarray(kernel))
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
  y1, w1 = ssm.causal_conv(jnp.asarray(x[:, :5]), jnp.asarray(kernel))  # then 2 more, one by one
  y2, w2 = ssm.causal_conv(jnp.asarray(x[:, 5:6]), jnp.asarray(kernel), w1)
  y3, _ = ssm.causal_conv(jnp.asarray(x[:, 6:]), jnp.asarray(kernel), w2)
  np.testing.assert_allclose(np.concatenate([y1, y2, y3], 1), want, rtol=1e-5, atol=1e-6)


def test_s4d_convolution_equals_its_recurrence_and_a_numpy_zoh():
  rng = np.random.default_rng(0)
  channels, n, length = 3, 4, 20
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), channels)).astype(np.float32)
  A = -np.arange(1, n + 1, dtype=np.float32)[None].repeat(channels, 0) * rng.uniform(0.5, 2, (channels, 1)).astype(np.float32)
  B, C = (rng.standard_normal((channels, n)).astype(np.float32) for _ in range(2))
  u = rng.standard_normal((2, length, channels)).astype(np.float32)
  # numpy: zero-order hold, then the recurrence in float64
  Abar = np.exp(dt[:, None] * A.astype(np.float64))
  Bbar = (Abar - 1) / A * B
  h, want = np.zeros((2, channels, n)), []
  for t in range(length):
    h = Abar * h + u[:, t, :, None] * Bbar
    want.append(np.einsum('bcn,cn->bc', h, C))
  want = np.stack(want, 1)
  kernel = ssm.s4d_kernel(jnp.asarray(dt), jnp.asarray(A), jnp.asarray(B), jnp.asarray(C), length)
  conv = ssm.fft_causal_conv(jnp.asarray(u), kernel)
  np.testing.assert_allclose(np.asarray(conv), want, rtol=1e-4, atol=1e-5)
  rec, h_last = ssm._lti_recurrence(jnp.asarray(u), jnp.asarray(dt), jnp.asarray(A),
                                    jnp.asarray(Bbar, jnp.float32), jnp.asarray(C),
                                    jnp.zeros((2, channels, n)))
  np.testing.assert_allclose(np.asarray(rec), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(h_last), h, rtol=1e-4, atol=1e-5)


# --- against transformers' MambaForCausalLM --------------------------------------------------

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
TOKENS = np.random.default_rng(0).integers(0, 101, (2, 16))


def hf_mamba(tied: bool, bias: bool):
  config = transformers.MambaConfig(
      vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
      conv_kernel=4, time_step_rank=4, use_bias=bias, use_conv_bias=True,
      tie_word_embeddings=tied, use_mambapy=True)
  model = transformers.MambaForCausalLM(config)
  torch.manual_seed(0)
  with torch.no_grad():  # non-trivial D, dt bias and A_log: every tensor moves the logits
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize('tied,bias', [(True, False), (False, True)])
def test_mamba_matches_transformers_logits_save_and_greedy_generate(tied, bias, tmp_path):
  theirs = hf_mamba(tied, bias)
  theirs.save_pretrained(tmp_path / 'hf')
  cfg, params = hf.load(tmp_path / 'hf')
  assert (cfg.layer_kinds, cfg.tie_embeddings, cfg.use_bias) == ('MM', tied, bias)
  with torch.no_grad():
    expected = theirs(torch.tensor(TOKENS)).logits.numpy()
  assert np.abs(expected).max() > 1.0
  for scan in SCANS:
    logits = models.build(dataclasses.replace(cfg, scan=scan, scan_chunk=4)).apply(
        {'params': params}, jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
  hf.save(cfg, params, tmp_path / 'ours')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
  assert type(reloaded).__name__ == 'MambaForCausalLM'
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(TOKENS)).logits.numpy(), expected,
                               atol=1e-4, rtol=0)
    theirs.generation_config.eos_token_id = None  # id 0 is an ordinary token here
    want = theirs.generate(torch.tensor(TOKENS[:1, :5]), max_new_tokens=12,
                           do_sample=False)[0, 5:].tolist()
  assert len(want) == 12
  assert sampling.generate(cfg, params, [TOKENS[0, :5]], max_new_tokens=12).tokens[0] == want


def test_a_mamba_directory_with_missing_or_extra_tensors(tmp_path):
  from safetensors.numpy import load_file, save_file
  hf_mamba(True, False).save_pretrained(tmp_path / 'm')
  weights = tmp_path / 'm' / 'model.safetensors'
  state = load_file(weights)
  save_file({**state, 'backbone.layers.0.mixer.extra.weight': np.zeros(3, np.float32)},
            str(weights))
  with pytest.raises(ConfigError, match=r"holds tensors that lm does not read: "
                                        r"\['backbone.layers.0.mixer.extra.weight'\]"):
    hf.load(tmp_path / 'm')
  save_file({k: v for k, v in state.items() if k != 'backbone.layers.1.mixer.D'}, str(weights))
  with pytest.raises(ConfigError, match=r"lack 'backbone.layers.1.mixer.D'"):
    hf.load(tmp_path / 'm')


# --- decoding through the interface ----------------------------------------------------------

def tiny(pattern: str, **kw) -> DecoderConfig:
  """A small decoder of `pattern`'s layers (no MLP for a pure Mamba or Mamba-2 model); Mamba-2
  layers get heads of 16 channels in 2 groups."""
  attention = any(k in 'GL' for k in pattern)
  base = dict(vocab_size=61, num_layers=len(pattern) * 2 if len(pattern) < 3 else len(pattern),
              d_model=32, num_heads=4, num_kv_heads=2,
              mlp_dim=0 if pattern in ('M', 'D') else 48, max_len=64,
              positions='rope' if attention else 'none', norm='rmsnorm', mlp='swiglu',
              use_bias=False, layer_pattern=pattern, window=3, state_size=4, scan_chunk=4,
              ssm_head_dim=16, ngroups=2)
  return DecoderConfig(**{**base, **kw})


def init(cfg: DecoderConfig, seed: int = 0):
  params = models.build(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
  # Scale the SSM parameters away from their init so that every part matters.
  return jax.tree.map(lambda x: x * 1.5, params['params'])


@pytest.mark.parametrize('pattern,scanned,shared_values', [
    ('M', False, False), ('MSLG', False, False), ('MG', True, False), ('D', False, False),
    ('DG', True, False), ('SLMG', False, True)])  # D: Mamba-2; shared: model.value_residual
def test_prefill_and_decode_steps_equal_the_full_forward(pattern, scanned, shared_values):
  cfg = tiny(pattern, scan_layers=scanned, value_residual=shared_values)
  params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 14), 0, 61)
  full = jax.jit(models.build(cfg).apply)({'params': params}, tokens)
  d = models.decoding(cfg)
  logits, state = jax.jit(d.prefill, static_argnums=3)(params, tokens[:, :6], None, 16)
  step = jax.jit(d.decode_step)
  steps = [logits]
  for t in range(6, 13):
    logits, state = step(params, tokens[:, t], state)
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), full[:, 5:13], atol=1e-4, rtol=1e-4)


def test_left_padded_rows_generate_what_each_generates_alone():
  cfg = tiny('MSLG')
  params = init(cfg)
  prompts = [[5, 9, 2, 7, 1, 3, 8], [4], [11, 12, 13]]
  batch = sampling.generate(cfg, params, prompts, max_new_tokens=10).tokens
  for prompt, row in zip(prompts, batch):
    assert sampling.generate(cfg, params, [prompt], max_new_tokens=10).tokens[0] == row


def test_beam_search_with_one_beam_is_greedy_on_a_hybrid():
  cfg = tiny('MSLG')
  params = init(cfg)
  prompts = [[5, 9, 2, 7], [4, 1]]
  greedy = sampling.generate(cfg, params, prompts, max_new_tokens=8).tokens
  assert sampling.beam_search(cfg, params, prompts, num_beams=1, max_new_tokens=8).tokens == greedy
  wide = sampling.beam_search(cfg, params, prompts, num_beams=3, max_new_tokens=8)
  assert all(len(t) == 8 for t in wide.tokens)


def test_beams_reorder_the_scan_state_as_they_would_recompute_it():
  """After reorder, each beam's state is the state of its own sequence run afresh."""
  cfg = tiny('MS', num_layers=2)
  params = init(cfg)
  d = models.decoding(cfg)
  prompts = jnp.array([[3, 4, 5], [6, 7, 8]])
  _, state = d.prefill(params, prompts, None, 8)
  state = d.expand(state, 2)  # rows: prompt 0 beams 0, 1; prompt 1 beams 0, 1
  tokens = jnp.array([10, 20, 30, 40])
  step = jax.jit(d.decode_step)
  _, state = step(params, tokens, state)
  parent = jnp.array([[1, 1], [1, 0]])  # both beams of prompt 0 continue its beam 1
  state = d.reorder(state, parent)
  logits, _ = step(params, jnp.array([1, 2, 3, 4]), state)
  forward = jax.jit(models.build(cfg).apply)
  for row, (p, j) in enumerate([(0, 1), (0, 1), (1, 1), (1, 0)]):
    seq = jnp.concatenate([prompts[p], tokens[2 * p + j:2 * p + j + 1], jnp.array([row + 1])])
    want = forward({'params': params}, seq[None])[0, -1]
    np.testing.assert_allclose(logits[row], want, atol=1e-4, rtol=1e-4)


def test_stream_yields_the_generated_text():
  from lm import tokenizers
  tok = tokenizers.load('bytes')
  cfg = tiny('MG', vocab_size=tok.vocab_size)
  params = init(cfg)
  prompt = [tok.bos_id, *tok.encode('def ')]
  out = sampling.generate(cfg, params, [prompt], max_new_tokens=12, eos_id=tok.eos_id,
                          pad_id=tok.pad_id).tokens[0]
  text = ''.join(sampling.stream(cfg, params, tok, prompt, max_new_tokens=12))
  assert text == tok.decode([t for t in out if t != tok.eos_id])


def test_a_model_without_attention_has_no_maximum_length():
  cfg = tiny('M', max_len=8)
  params = init(cfg)
  assert models.decoding(cfg).max_len is None
  out = sampling.generate(cfg, params, [list(range(1, 20))], max_new_tokens=30)
  assert len(out.tokens[0]) == 30
  with pytest.raises(ConfigError, match='exceeds the model context 8'):
    sampling.generate(tiny('MG', max_len=8), init(tiny('MG', max_len=8)), [list(range(1, 20))],
                      max_new_tokens=4)


def test_a_decode_step_costs_the_same_state_at_any_position():
  cfg = tiny('MS', num_layers=2)
  d = models.decoding(cfg)
  params = init(cfg)
  _, short = d.prefill(params, jnp.ones((1, 16), jnp.int32), None, 32)
  _, long = d.prefill(params, jnp.ones((1, 16), jnp.int32), None, 10_000)
  shapes = lambda s: [x.shape for x in jax.tree.leaves(s['layers'])]
  assert shapes(short) == shapes(long)  # no state grows with the length


# --- weight decay, FLOPs, bad input ----------------------------------------------------------

def test_scan_layers_declare_their_no_decay_parameters():
  decays = common.decays(models.abstract_params(models.build(tiny('MS', num_layers=2))))
  no_decay = sorted(k for k, v in decays.items() if not v)
  assert no_decay == sorted([
      'block_0/mamba/A_log', 'block_0/mamba/D', 'block_0/mamba/conv_bias',
      'block_0/mamba/dt_bias', 'block_0/mixer_norm/scale', 'block_0/mlp_norm/scale',
      'block_1/s4d/A_log', 'block_1/s4d/D', 'block_1/s4d/log_dt', 'block_1/mixer_norm/scale',
      'block_1/mlp_norm/scale', 'final_norm/scale'])
  assert decays['block_0/mamba/in_proj/kernel'] and decays['block_1/s4d/C']


def test_mamba_flops_count_its_matmuls():
  cfg = tiny('M', num_layers=1, d_model=32, state_size=4, vocab_size=61)
  inner, rank = 64, 2
  matmul = 2 * 32 * inner + (rank + 8) * inner + rank * inner + inner * 32
  want = 3 * (2 * matmul + 2 * 4 * inner + 8 * inner * 4) + 6 * 32 * 61
  assert decoder.train_flops_per_token(cfg, 128) == want


@pytest.mark.parametrize('overrides,message', [
    (dict(layer_pattern='MXG'), r"model\.layer_pattern='MXG': use one letter a layer"),
    (dict(layer_pattern='ML'), r"model\.layer_pattern='ML': local \(L\) layers need model\.window"),
    (dict(layer_pattern='M', state_size=0), r'model\.state_size=0: must be >= 1'),
    (dict(layer_pattern='M', d_conv=0), r'model\.d_conv=0: must be >= 1'),
    (dict(layer_pattern='M', expand=0), r'model\.expand=0: must be >= 1'),
    (dict(layer_pattern='M', dt_rank=-1), r'model\.dt_rank=-1: the rank of the time step'),
    (dict(layer_pattern='S', dt_min=0.1, dt_max=0.1), r'model\.dt_min=0\.1: .*0 < dt_min < dt_max'),
    (dict(layer_pattern='M', scan='fast'), r"model\.scan='fast': use one of"),
    (dict(layer_pattern='M', scan='chunked', scan_chunk=48), r'model\.scan_chunk=48: the chunked scan splits '
                                             r'data\.seq_len=128 into chunks: give a divisor'),
    (dict(layer_pattern='MG', positions='none'), r"model\.positions='none': layer_pattern='MG' "
                                                 r'has attention layers'),
])
def test_bad_scan_options(overrides, message):
  from lm import config as config_lib
  c = load_config()
  c.data.seq_len = c.model.max_len = 128  # the byte-level default's, which the messages name
  c.model.update(overrides)
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(c, vocab_size=259, device_count=1)


def test_a_key_of_another_family_is_one_line_naming_its_owner():
  from lm import config as config_lib
  c = load_config('encoder')
  c.model.state_size = 16
  with pytest.raises(ConfigError, match=r"model\.state_size=16: a key of the decoder family, "
                                        r"and model\.family='encoder'; remove it"):
    config_lib.parse(c, vocab_size=259, device_count=1)
  c = load_config()
  c.model.num_segments = 2
  with pytest.raises(ConfigError, match=r'model\.num_segments=2: a key of the encoder family'):
    config_lib.parse(c, vocab_size=259, device_count=1)


@pytest.mark.parametrize('pattern,positions', [('MSLG', 'rope'), ('G', 'learned')])
def test_packed_rows_equal_each_segment_run_alone(pattern, positions):
  """segment_ids and positions (packed rows): attention, convolution and scan states stay
  within each segment, so every segment's logits are its logits alone; the causal loss reads
  them from the batch."""
  from lm import objectives
  cfg = tiny(pattern, positions=positions, num_layers=4)
  params = init(cfg)
  model = models.build(cfg)
  apply = jax.jit(model.apply)
  lengths = [5, 1, 6]
  docs = [jax.random.randint(jax.random.PRNGKey(i), (n,), 0, 61) for i, n in enumerate(lengths)]
  tokens = jnp.concatenate(docs)[None]
  segment_ids = jnp.concatenate([jnp.full((n,), i) for i, n in enumerate(lengths)])[None]
  positions_ = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
  packed = apply({'params': params}, tokens, segment_ids=segment_ids, positions=positions_)
  start = 0
  for doc in docs:
    alone = apply({'params': params}, doc[None])
    np.testing.assert_allclose(packed[:, start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
    start += len(doc)
  unpacked = apply({'params': params}, tokens)
  assert not np.allclose(unpacked[:, 5:], packed[:, 5:], atol=1e-3)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, 1), 'loss_mask': jnp.ones_like(
      tokens, bool), 'segment_ids': segment_ids, 'positions': positions_}
  loss_fn = lambda p: objectives.clm_loss(p, batch, None, apply_fn=model.apply)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  want = jnp.mean(objectives.token_nll(packed, batch['targets']))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
