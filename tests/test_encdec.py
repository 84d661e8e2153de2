"""The encoder-decoder family (T5, the original transformer) against `transformers`' T5 with
random weights, hand-computed buckets and FLOPs, and its own invariants; span corruption
against its definition; the span and seq2seq tasks end to end; each bad input's error."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib, hf, models, sampling, train
from lm.config import ConfigError
from lm.data import span
from lm.models import EncDecConfig
from lm.models.layers.attention import relative_position_bucket
from lm.tokenizers import tokenizer as tokenizer_lib
from tests.conftest import ROOT, load_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ORIGINAL = dict(positions='sinusoidal', scale_embeddings=True, post_norm=True, norm='layernorm',
                use_bias=True, scaled_attention=True, mlp='relu')


def small(**kw) -> EncDecConfig:
  return EncDecConfig(**{**dict(vocab_size=101, num_layers=2, num_decoder_layers=3, d_model=32,
                                num_heads=4, mlp_dim=64, max_len=64, relative_buckets=8,
                                relative_max_distance=20), **kw})


def init(cfg: EncDecConfig, seed: int = 0) -> dict:
  params = models.build(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))
  return jax.tree.map(lambda x: x * 5, jax.device_get(  # large, so every weight matters
      __import__('flax').linen.meta.unbox(params['params'])))


# --- transformers' T5 -----------------------------------------------------------------------

def hf_t5(layout: str, directory):
  """A random T5ForConditionalGeneration saved to `directory` and read back by transformers:
  `original` (ReLU, tied head scaled by d_model^-0.5) or `v1.1` (gated GELU, untied head)."""
  config = transformers.T5Config(
      vocab_size=101, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
      dropout_rate=0.0, feed_forward_proj='relu' if layout == 'original' else 'gated-gelu',
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(directory)
  if layout == 'v1.1':  # an untied head of its own, as T5 v1.1's checkpoints hold it
    from safetensors.numpy import load_file, save_file
    tensors = load_file(directory / 'model.safetensors')
    tensors['lm_head.weight'] = np.random.default_rng(1).normal(0, 0.5, (101, 32)).astype(np.float32)
    save_file(tensors, directory / 'model.safetensors', metadata={'format': 'pt'})
    hf_config = json.loads((directory / 'config.json').read_text())
    hf_config.update(tie_word_embeddings=False)
    hf_config.pop('scale_decoder_outputs', None)
    (directory / 'config.json').write_text(json.dumps(hf_config))
  return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


INPUTS = np.random.default_rng(0).integers(2, 101, (3, 12))
LENGTHS = np.array([12, 7, 3])
MASK = np.arange(12)[None] < LENGTHS[:, None]
DECODER = np.concatenate([np.zeros((3, 1), int),
                          np.random.default_rng(1).integers(2, 101, (3, 6))], axis=1)


def hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(INPUTS), attention_mask=torch.tensor(MASK),
                 decoder_input_ids=torch.tensor(DECODER)).logits.numpy()


def lm_logits(cfg, params) -> np.ndarray:
  return np.asarray(models.build(cfg).apply({'params': params}, jnp.asarray(INPUTS),
                                            jnp.asarray(DECODER), padding_mask=jnp.asarray(MASK)))


@pytest.mark.parametrize('layout', ['original', 'v1.1'])
def test_t5_loads_saves_and_generates_as_transformers(layout, tmp_path):
  theirs = hf_t5(layout, tmp_path / 'hf')
  cfg, params = hf.load(tmp_path / 'hf')
  assert (cfg.mlp, cfg.tie_embeddings) == (('relu', True) if layout == 'original'
                                            else ('geglu', False))
  assert (cfg.num_layers, cfg.decoder_layers, cfg.relative_buckets) == (2, 3, 8)
  expected = hf_logits(theirs)
  np.testing.assert_allclose(lm_logits(cfg, params), expected, atol=1e-4, rtol=1e-4)
  hf.save(cfg, params, tmp_path / 'back')  # and back: transformers reads the same model
  again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'back').eval()
  np.testing.assert_allclose(hf_logits(again), expected, atol=1e-4, rtol=1e-4)
  with torch.no_grad():  # greedy decoding, with padding
    out = theirs.generate(input_ids=torch.tensor(INPUTS), attention_mask=torch.tensor(MASK),
                          max_new_tokens=10, do_sample=False, num_beams=1, eos_token_id=None,
                          min_new_tokens=10, use_cache=False).numpy()  # (its cache
                          # assumes as many decoder layers as encoder ones)
  prompts = [row[:n].tolist() for row, n in zip(INPUTS, LENGTHS)]
  ours = sampling.generate(cfg, params, prompts, max_new_tokens=10).tokens
  assert ours == out[:, 1:].tolist()  # theirs begins with the start token


def test_unsupported_t5_directories(tmp_path):
  hf_t5('original', tmp_path / 'hf')
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**config, 'feed_forward_proj': 'gelu'}))
  with pytest.raises(ConfigError, match=r"feed_forward_proj='gelu'; lm's T5 takes"):
    hf.load(tmp_path / 'hf')
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(config))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(tmp_path / 'hf' / 'model.safetensors')
  extra = {**tensors, 'decoder.block.0.layer.3.layer_norm.weight': np.ones(32, np.float32)}
  save_file(extra, tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(ConfigError, match=r"holds tensors that lm does not read: "
                     r"\['decoder.block.0.layer.3.layer_norm.weight'\]"):
    hf.load(tmp_path / 'hf')
  del tensors['encoder.block.1.layer.1.DenseReluDense.wo.weight']
  save_file(tensors, tmp_path / 'hf' / 'model.safetensors')
  with pytest.raises(ConfigError, match=r"lack 'encoder.block.1.layer.1.DenseReluDense.wo"):
    hf.load(tmp_path / 'hf')
  with pytest.raises(ConfigError, match='no supported Hugging Face architecture'):
    hf.save(small(**ORIGINAL), init(small(**ORIGINAL)), tmp_path / 'out')


# --- the model's invariants -----------------------------------------------------------------

def test_relative_position_buckets_by_hand():
  rel = jnp.array([-200, -40, -9, -8, -7, -1, 0, 1, 7, 8, 9, 40, 200])
  # bidirectional, 32 buckets up to 128: 16 a side, 8 exact, then 8 + floor(log(d/8) /
  # log(16) * 8); keys after the query in 16..31
  both = [15, 12, 8, 8, 7, 1, 0, 17, 23, 24, 24, 28, 31]
  np.testing.assert_array_equal(relative_position_bucket(rel, True, 32, 128), both)
  # causal: keys after the query in bucket 0; 16 exact, then 16 + floor(log(d/16) / log(8) * 16)
  causal = [31, 23, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(relative_position_bucket(rel, False, 32, 128), causal)


@pytest.mark.parametrize('kind', ['t5', 'original'])
def test_padding_causality_and_decoding_steps(kind):
  cfg = small(**(ORIGINAL if kind == 'original' else dict(mlp='geglu', tie_embeddings=False)))
  model, params = models.build(cfg), init(cfg)
  inputs, decoder = jnp.asarray(INPUTS), jnp.asarray(DECODER)
  full = np.asarray(model.apply({'params': params}, inputs, decoder, padding_mask=MASK))
  # the encoder reads only real tokens: row 1 alone, unpadded, gives the same logits
  alone = model.apply({'params': params}, inputs[1:2, :7], decoder[1:2])
  # (logits up to about 80: float32 rounding of the padded and unpadded matmuls differs by
  # up to 4e-5 on the AMD EPYC host; a padding leak moves them by order 1)
  np.testing.assert_allclose(full[1:2], alone, atol=1e-4)
  # the decoder is causal: changing its input 4 leaves the logits before it
  changed = model.apply({'params': params}, inputs, decoder.at[:, 4].set(5), padding_mask=MASK)
  np.testing.assert_allclose(full[:, :4], changed[:, :4], atol=1e-6)
  assert np.abs(full[:, 4:] - np.asarray(changed[:, 4:])).max() > 1e-3
  # prefill (left-padded prompts) plus decode steps give the full forward's logits
  d = models.decoding(cfg)
  prompts, lengths = sampling.left_pad([row[:n] for row, n in zip(INPUTS, LENGTHS)], 0)
  logits, state = d.prefill(params, jnp.asarray(prompts), jnp.asarray(lengths),
                            prompts.shape[1] + 6)
  steps = [logits]
  for t in range(1, 7):
    logits, state = d.decode_step(params, decoder[:, t], state)
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps[:-1], 1), full[:, :6], atol=3e-4, rtol=1e-4)
  # beam search with one beam is greedy
  rows = [row[:n].tolist() for row, n in zip(INPUTS, LENGTHS)]
  greedy = sampling.generate(cfg, params, rows, max_new_tokens=6).tokens
  assert sampling.beam_search(cfg, params, rows, num_beams=1, max_new_tokens=6).tokens == greedy


def test_remat_gives_the_plain_models_loss_and_gradients():
  for cfg in (small(mlp='geglu'), small(**ORIGINAL)):
    params = init(cfg)
    loss = lambda c: jax.value_and_grad(lambda p: jnp.sum(models.build(c).apply(
        {'params': p}, jnp.asarray(INPUTS), jnp.asarray(DECODER), padding_mask=MASK) ** 2))(params)
    (plain, grads), (remat, remat_grads) = loss(cfg), loss(dataclasses.replace(cfg, remat='full'))
    assert plain == remat
    jax.tree.map(np.testing.assert_array_equal, grads, remat_grads)


def test_flops_per_token_by_hand():
  cfg = small(mlp='geglu')  # D 32, F 64, 2 + 3 layers, V 101, 4 heads of 8
  block = 4 * 32 * 32 + 3 * 32 * 64
  encoder = 6 * (2 * block + 3 * 2 * 32 * 32) + 12 * 2 * 16 * 4 * 8
  decoder = 6 * (3 * (block + 2 * 32 * 32) + 32 * 101) + 12 * 3 * (5 + 16) * 4 * 8
  from lm.models import encdec
  assert encdec.encoder_flops_per_token(cfg, 16) == encoder
  assert encdec.decoder_flops_per_token(cfg, 16, 5) == decoder
  assert models.train_flops_per_token(cfg, models.TokenCounts(16, target_len=5)) == pytest.approx(
      encoder + 5 / 16 * decoder)


# --- span corruption --------------------------------------------------------------------------

def test_span_corruption_lengths_rebuild_and_statistics():
  assert span.lengths(512, 0.15, 3.0) == span.Lengths(568, 85, 28, 512, 114)  # T5's numbers
  n = span.lengths(100, 0.15, 3.0)
  raw = jnp.arange(1000, 1000 + n.raw)
  sentinels = jnp.arange(100)
  span_lengths, noise_shares = [], []
  corrupt = jax.jit(lambda key: span.corrupt(key, raw, n, sentinels, -1))
  for i in range(400):
    inputs, targets = map(np.asarray, corrupt(jax.random.PRNGKey(i)))
    assert inputs.shape == (n.inputs,) and targets.shape == (n.targets,)
    assert inputs[-1] == -1 and targets[-1] == -1  # EOS ends both, every slot filled
    is_sentinel = lambda x: (x >= 0) & (x < 100)
    in_sentinels, out_sentinels = inputs[is_sentinel(inputs)], targets[is_sentinel(targets)]
    np.testing.assert_array_equal(in_sentinels, np.arange(n.spans))  # in order, once each
    np.testing.assert_array_equal(out_sentinels, np.arange(n.spans))
    assert targets[0] == 0
    # the input with each sentinel replaced by its span is the raw row
    spans = np.split(targets[:-1], np.flatnonzero(targets[:-1] < 100)[1:])
    fills = {int(s[0]): s[1:] for s in spans}
    rebuilt = np.concatenate([fills[int(t)] if t < 100 else [t] for t in inputs[:-1]])
    np.testing.assert_array_equal(rebuilt, np.asarray(raw))
    # T5's counts exactly: N noise tokens in M non-empty spans
    assert sorted(fills) == list(range(n.spans)) and min(map(len, fills.values())) >= 1
    assert sum(map(len, fills.values())) == n.noise == round(0.15 * n.raw)
    span_lengths += [len(f) for f in fills.values()]
    noise_shares.append(sum(map(len, fills.values())) / n.raw)
  # over the draws, the span lengths follow a uniform composition of N into M positive parts:
  # P(a span has k tokens) = C(N - k - 1, M - 2) / C(N - 1, M - 1), of mean N / M
  from math import comb
  k_K = np.arange(1, n.noise - n.spans + 2)
  expected_K = np.array([comb(n.noise - k - 1, n.spans - 2) for k in k_K]) / comb(n.noise - 1,
                                                                                 n.spans - 1)
  seen_K = np.bincount(span_lengths, minlength=k_K[-1] + 1)[1:] / len(span_lengths)
  np.testing.assert_allclose(seen_K, expected_K, atol=0.03)
  assert np.mean(span_lengths) == pytest.approx(n.noise / n.spans) == pytest.approx(3.2)
  assert np.mean(noise_shares) == pytest.approx(0.15, abs=0.005)
  # the draws differ from key to key: not one fixed mask
  a, b = corrupt(jax.random.PRNGKey(0))[0], corrupt(jax.random.PRNGKey(1))[0]
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_tokenizers_have_sentinels_and_older_ones_load(tmp_path):
  tok = tokenizer_lib.byte_tokenizer()
  assert tok.format == 2 and len(tok.sentinel_ids) == 100 and tok.vocab_size == 369
  assert tok.sentinel_ids == list(range(269, 369))
  assert tok.id_to_bytes(tok.sentinel_ids[7]) == b'<|extra_id_7|>'
  assert tok.encode('<|extra_id_0|>') == list(b'<|extra_id_0|>')  # text never a control token
  old = tokenizer_lib.byte_tokenizer(format=1)  # a tokenizer saved before the sentinels
  old.save(tmp_path / 'old')
  loaded = tokenizer_lib.load_dir(tmp_path / 'old')
  assert (loaded.format, loaded.vocab_size, loaded.sentinel_ids) == (1, 269, [])
  header = json.loads((tmp_path / 'old' / 'tokenizer.json').read_text())
  (tmp_path / 'old' / 'tokenizer.json').write_text(json.dumps({**header, 'format': 3}))
  with pytest.raises(ConfigError, match='format 3 is not one this version reads'):
    tokenizer_lib.load_dir(tmp_path / 'old')


# --- the tasks end to end -------------------------------------------------------------------

def encdec_config(corpus, cache_dir, **data):
  # seq2seq: configs/seq2seq.py, the same model with the seq2seq task's data keys
  c = load_config('seq2seq' if data.get('task') == 'seq2seq' else 'encdec')
  c.tokenizer.kind = 'bytes'
  c.model.update(num_layers=2, num_decoder_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                 max_len=64)
  c.data.update({**dict(paths=str(corpus / '*.py'), seq_len=48, val_fraction=0.25,
                       cache_dir=str(cache_dir)), **data})
  c.train.update(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2, log_every=5,
                 eval_every=15, eval_batches=2, checkpoint_every=15, peak_flops=1e9,
                 num_samples=2)
  return c


@pytest.mark.slow
def test_span_training_learns_and_reports_fills(corpus, tmp_path, capsys):
  c = encdec_config(corpus, tmp_path / 'cache')
  c.train.update(steps=80, eval_every=40, checkpoint_every=40, learning_rate=1e-2)
  result = train.run(c, tmp_path / 'run')
  out = capsys.readouterr().out
  metrics = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text()
             .splitlines()]
  losses = [m['train/loss'] for m in metrics if 'train/loss' in m]
  assert losses[-1] < losses[0] - 1.0
  assert result['val/accuracy'] > result['val/mode_accuracy']  # beats the commonest token
  assert 'span corruption: rows of 52 tokens, 8 of them noise in 3 spans; inputs 48 and ' \
         'targets 12 tokens' in out
  assert out.count('input:  ') == 2 and '<|extra_id_0|>' in out and 'model:  ' in out
  # the CLI samples it: the prompt goes to the encoder, the new tokens come from the decoder
  proc = subprocess.run([sys.executable, '-m', 'lm.sample', f'--workdir={tmp_path / "run"}',
                         '--prompt=def f1_2(x):', '--max_new_tokens=8', '--temperature=0'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('def f1_2(x):')
  from lm import load  # streaming yields the text of the greedy tokens
  cfg, params, tok = load.model(tmp_path / 'run')
  prompt = [tok.bos_id, *tok.encode('def f1_2(x):')]
  greedy = sampling.generate(cfg, params, [prompt], max_new_tokens=8, eos_id=tok.eos_id,
                             pad_id=tok.pad_id).tokens[0]
  streamed = ''.join(sampling.stream(cfg, params, tok, prompt, max_new_tokens=8))
  assert streamed == tok.decode(greedy) and proc.stdout == f'def f1_2(x):{streamed}\n'


@pytest.mark.slow
def test_seq2seq_training_and_a_bad_line(corpus, tmp_path):
  pairs = tmp_path / 'pairs.jsonl'
  rows = [{'input': f'add {i} and {j}', 'target': str(i + j)} for i in range(12)
          for j in range(12)]
  pairs.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  c = encdec_config(corpus, tmp_path / 'cache', task='seq2seq', seq_len=16, target_len=4)
  c.data.paths = str(pairs)
  c.train.update(steps=60, eval_every=30, checkpoint_every=30, learning_rate=1e-2)
  result = train.run(c, tmp_path / 'run')
  assert result['val/loss'] < 2.0 and result['val/accuracy'] > result['val/mode_accuracy']
  pairs.write_text(json.dumps(rows[0]) + '\n' + json.dumps({'input': 'x'}) + '\n')
  with pytest.raises(ConfigError, match=rf'{pairs}:2: a seq2seq line is one JSON object with '
                     r'"input" and "target" strings \(KeyError'):
    train.run(c, tmp_path / 'run2')


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize('section,key,value,message', [
    ('data', 'noise_density', 0.0, r'data.noise_density=0.0: the share of noise tokens must be '
     r'in \(0, 1\)'),
    ('data', 'noise_density', 1.0, r'data.noise_density=1.0: the share'),
    ('data', 'mean_noise_span', 0.5, r'data.mean_noise_span=0.5: a noise span holds at least'),
    ('data', 'seq_len', 2, r'data.seq_len=2: too short for one noise span'),
    ('model', 'window', 8, r"model.window=8: a key of the decoder family, and "
     r"model.family='encdec'"),
    ('model', 'num_experts', 4, r"model.num_experts=4: a key of the decoder family"),
    ('model', 'scan_layers', True, r"model.scan_layers=True: a key of the decoder family"),
    ('model', 'positions', 'rope', r"model.positions='rope': use one of \('relative', "
     r"'sinusoidal'\)"),
])
def test_bad_config_values(section, key, value, message):
  c = load_config('encdec')
  c[section][key] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(c, vocab_size=369, device_count=1)
