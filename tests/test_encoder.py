"""The encoder family (BERT): the model against transformers' BertForPreTraining, padding
invariance, BERT's masking, sentence pairs, training, fill_mask and embed, bad input."""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import checkpoint, encoding, hf, load, models, objectives, sample, tokenizers, train
from lm.config import ConfigError
from lm.models import EncoderConfig
from lm.data import corpus, store
from lm.tasks import mlm_nsp
from lm.models import encoder
from lm.models.layers import attention
from tests.conftest import load_config

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

CFG = EncoderConfig(vocab_size=61, num_layers=2, d_model=32, num_heads=4,
                  mlp_dim=64, max_len=24, norm_eps=1e-12, mlp='gelu_exact', post_norm=True,
                  num_segments=2)
IDS = mlm_nsp.SpecialIds(cls=58, sep=59, pad=60)


def bert(seed: int = 0):
  """A random BertForPreTraining with large weights, so that every tensor moves the logits."""
  config = transformers.BertConfig(
      vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, num_hidden_layers=CFG.num_layers,
      num_attention_heads=CFG.num_heads, intermediate_size=CFG.mlp_dim,
      max_position_embeddings=CFG.max_len, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  torch.manual_seed(seed)
  model = transformers.BertForPreTraining(config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def pair_batch():
  """Two rows of [CLS] A [SEP] B [SEP]: one fills the sequence, one is padded."""
  rng = np.random.default_rng(0)
  rows = [mlm_nsp.encode_pair(rng.integers(0, 58, 9), rng.integers(0, 58, 10), 0, 22, IDS),
          mlm_nsp.encode_pair(rng.integers(0, 58, 4), rng.integers(0, 58, 6), 1, 22, IDS)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_logits_and_loss_equal_transformers_bert_for_pretraining(tmp_path):
  theirs = bert()
  theirs.save_pretrained(tmp_path / 'bert')
  cfg, params = hf.load(tmp_path / 'bert')
  assert cfg == CFG
  batch = pair_batch()
  valid = batch['tokens'] != IDS.pad
  assert not valid.all() and (batch['segment_ids'] == 1).any()
  inputs, chosen = objectives.mask_tokens(jax.random.PRNGKey(0), jnp.asarray(batch['tokens']),
                                          jnp.asarray(batch['tokens'] < 58), 0.3, 57, 58)
  mlm, nsp = models.build(cfg).apply({'params': params}, inputs,
                                     segment_ids=batch['segment_ids'], padding_mask=valid)
  labels = np.where(chosen, batch['tokens'], -100).astype(np.int64)
  with torch.no_grad():
    out = theirs(torch.tensor(np.asarray(inputs)), token_type_ids=torch.tensor(batch['segment_ids']),
                 attention_mask=torch.tensor(valid.astype(np.int64)), labels=torch.tensor(labels),
                 next_sentence_label=torch.tensor(batch['nsp_labels'].astype(np.int64)))
  expected_mlm = out.prediction_logits.numpy()
  assert np.abs(expected_mlm).max() > 1.0  # the logits are not all near 0
  np.testing.assert_allclose(np.asarray(mlm)[valid], expected_mlm[valid], atol=1e-4)
  np.testing.assert_allclose(np.asarray(nsp), out.seq_relationship_logits.numpy(), atol=1e-4)
  sums = objectives.mlm_nsp_terms(mlm, nsp, jnp.asarray(batch['tokens']), chosen,
                                  jnp.asarray(batch['nsp_labels']))
  np.testing.assert_allclose(float(objectives.mlm_nsp_metrics(sums)['loss']), out.loss.item(),
                             rtol=1e-5)


def test_save_writes_what_transformers_loads_with_the_same_logits(tmp_path):
  boxed = models.build(CFG).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                        nn.meta.unbox(boxed))
  hf.save(CFG, params, tmp_path / 'out')
  theirs, info = transformers.BertForPreTraining.from_pretrained(tmp_path / 'out',
                                                                 output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  batch = pair_batch()
  valid = batch['tokens'] != IDS.pad
  mlm, nsp = models.build(CFG).apply({'params': params}, batch['tokens'],
                                     segment_ids=batch['segment_ids'], padding_mask=valid)
  with torch.no_grad():
    out = theirs.eval()(torch.tensor(batch['tokens']),
                        token_type_ids=torch.tensor(batch['segment_ids']),
                        attention_mask=torch.tensor(valid.astype(np.int64)))
  np.testing.assert_allclose(np.asarray(mlm)[valid], out.prediction_logits.numpy()[valid],
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(nsp), out.seq_relationship_logits.numpy(), atol=1e-4)
  assert hf.load(tmp_path / 'out')[0] == CFG


@pytest.mark.parametrize('post_norm', [True, False])
def test_appending_padding_leaves_the_real_positions_unchanged(post_norm):
  cfg = dataclasses.replace(CFG, post_norm=post_norm)
  model = models.build(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  batch = pair_batch()
  row = {k: v[1:] for k, v in batch.items()}  # the padded row
  used = int((row['tokens'] != IDS.pad).sum())
  short = model.apply({'params': params}, row['tokens'][:, :used],
                      segment_ids=row['segment_ids'][:, :used])
  long = model.apply({'params': params}, row['tokens'], segment_ids=row['segment_ids'],
                     padding_mask=row['tokens'] != IDS.pad)
  np.testing.assert_allclose(np.asarray(long[0])[:, :used], np.asarray(short[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(long[1]), np.asarray(short[1]), atol=1e-5)
  unmasked = model.apply({'params': params}, row['tokens'], segment_ids=row['segment_ids'])
  assert not np.allclose(np.asarray(unmasked[1]), np.asarray(short[1]), atol=1e-5)


def test_pre_norm_has_a_final_norm_and_no_hugging_face_twin():
  cfg = dataclasses.replace(CFG, post_norm=False)
  params = models.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert 'final_norm' in params and 'final_norm' not in models.build(CFG).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  with pytest.raises(ConfigError, match='post_norm=False'):
    hf.config_to_hf(cfg)


def test_bidirectional_attention_with_padding_equals_a_numpy_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 9, 4, 8)).astype(np.float32) for _ in range(3))
  valid = np.ones((2, 9), bool)
  valid[1, 6:] = False
  out = attention.attention(*map(jnp.asarray, (q, k, v)), causal=False, key_valid_BxS=valid, block=4)
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(8)
  logits = np.where(valid[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum('bhts,bshd->bthd', weights / weights.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_masking_statistics_over_many_draws():
  tokens = np.random.default_rng(0).integers(0, 57, (4000, 24)).astype(np.int32)  # 57: [MASK]
  tokens[:, 0], tokens[:, 11], tokens[:, 20:] = IDS.cls, IDS.sep, IDS.pad  # 18 ordinary a row
  tokens[::2, 12:19] = IDS.pad  # 11 in even rows
  inputs, chosen = jax.device_get(objectives.mask_tokens(
      jax.random.PRNGKey(3), jnp.asarray(tokens), jnp.asarray(tokens < 58), 0.15, 57, 57))
  eligible = tokens < 58
  assert not (chosen & ~eligible).any()  # never a special token or padding
  # round(0.15 * 18) = 3 and round(0.15 * 11) = 2 a row, each ordinary position equally likely
  np.testing.assert_array_equal(chosen.sum(1), np.where(np.arange(4000) % 2, 3, 2))
  odd = chosen[1::2][:, eligible[1]].mean(0)
  assert np.abs(odd - 3 / 18).max() < 0.03, odd
  n = chosen.sum()
  masked = (inputs == 57) & chosen
  kept = (inputs == tokens) & chosen
  changed = chosen & ~masked & ~kept
  # 80% [MASK]; 10% a random ordinary token (the same token 1/57 of the time); 10% kept.
  assert abs(masked.sum() / n - 0.8) < 0.015
  assert abs(changed.sum() / n - 0.1 * 56 / 57) < 0.01
  assert abs(kept.sum() / n - (0.1 + 0.1 / 57)) < 0.01
  assert inputs[changed].max() < 57 and inputs[changed].min() >= 0
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])


def test_mask_rate_sets_the_count_per_row():
  tokens = jnp.zeros((3, 40), jnp.int32)
  eligible = jnp.arange(40)[None] < jnp.array([[40], [10], [0]])
  _, chosen = objectives.mask_tokens(jax.random.PRNGKey(0), tokens, eligible, 0.3, 1, 5)
  assert chosen.sum(1).tolist() == [12, 3, 0]


def test_a_sentence_is_a_line_with_the_blank_lines_after_it():
  document = '\n  \nimport os\n\n\ndef f():\n    return 1\n  \nx = 2'
  assert corpus.lines(document) == ['import os\n\n\n', 'def f():\n', '    return 1\n  \n', 'x = 2']
  assert ''.join(corpus.lines(document)) == document[4:]
  assert corpus.lines('\n\n') == [] and corpus.lines('') == []


def sentence_split(docs: list[list[int]]) -> store.Split:
  """A split whose sentence s of document d is the tokens [d, s] repeated s + 1 times."""
  sentences = [[d, s] * (s + 1) for d, n in enumerate(docs) for s in range(n)]
  lengths = [len(x) for x in sentences]
  return store.Split(np.concatenate(sentences).astype(np.uint16), 0, len(docs),
                     np.concatenate([[0], np.cumsum(lengths)]),
                     np.concatenate([[0], np.cumsum(docs)]))


def test_pairs_have_both_labels_half_the_time_right_segments_and_lengths():
  split = sentence_split([5, 1, 8, 3, 6])
  np.testing.assert_array_equal(mlm_nsp.anchors(split), [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12,
                                                          14, 15, 17, 18, 19, 20, 21])
  labels = collections.Counter()
  for seq_len in (5, 9, 30):
    for j in range(600):
      anchor = int(mlm_nsp.anchors(split)[j % 18])
      a, b, label = mlm_nsp.make_pair(split, anchor, np.random.default_rng([seq_len, j]),
                                        seq_len - 3)
      labels[label] += 1
      assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= seq_len - 3
      # A sentence is [doc, index] repeated: A keeps its end, so its last token is the index
      # of its last sentence; B keeps its start, so its first token is its document.
      doc_of_anchor = int(np.searchsorted(split.document_starts, anchor, 'right') - 1)
      if label == mlm_nsp.IS_NEXT:
        assert b[0] == doc_of_anchor and (len(b) == 1 or b[1] == a[-1] + 1)
      else:
        assert b[0] != doc_of_anchor
      row = mlm_nsp.encode_pair(a, b, label, seq_len, IDS)
      used = len(a) + len(b) + 3
      np.testing.assert_array_equal(row['tokens'][:used],
                                    [IDS.cls, *a, IDS.sep, *b, IDS.sep])
      assert (row['tokens'][used:] == IDS.pad).all()
      np.testing.assert_array_equal(row['segment_ids'],
                                    [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (seq_len - used))
  assert abs(labels[0] / sum(labels.values()) - 0.5) < 0.04


def test_trimming_cuts_the_longer_side_at_its_outer_end():
  assert mlm_nsp.trim(100, 10, 60) == (50, 10)
  assert mlm_nsp.trim(10, 100, 60) == (10, 50)
  assert mlm_nsp.trim(100, 100, 61) == (31, 30)
  assert mlm_nsp.trim(3, 4, 60) == (3, 4)
  split = sentence_split([2, 2])  # sentence 1 of doc 0 is [0, 1, 0, 1]
  a, b, label = mlm_nsp.make_pair(split, 0, np.random.default_rng(0), 3)
  assert len(a) + len(b) == 3 and list(a[-1:]) == [0]  # A keeps its end, B its start
  assert b[0] in (0, 1)


def test_the_training_stream_resumes_from_its_state():
  split = sentence_split([5, 4, 8, 3, 6, 2])
  make = lambda: iter(mlm_nsp.train_dataset(split, seq_len=12, batch_size=4, seed=0, ids=IDS))
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_batches_are_fixed_and_padded_with_unlabelled_rows():
  split = sentence_split([5, 4, 8])
  one = mlm_nsp.eval_batches(split, seq_len=12, batch_size=4, ids=IDS, seed=0)
  two = mlm_nsp.eval_batches(split, seq_len=12, batch_size=4, ids=IDS, seed=0)
  assert len(one) == 4  # 14 anchors in batches of 4
  for x, y in zip(one, two):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert list(one[-1]['nsp_labels'][2:]) == [mlm_nsp.NO_LABEL] * 2


def encoder_config(corpus_dir: Path, cache: Path, **train_overrides):
  c = load_config('encoder')
  c.model.update(num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=48)
  c.data.update(paths=str(corpus_dir / '*.txt'), seq_len=48, val_fraction=0.3, cache_dir=str(cache))
  c.train.update(steps=300, batch_size=16, learning_rate=2e-3, warmup_steps=20, log_every=10,
                 eval_every=100, eval_batches=4, checkpoint_every=100, peak_flops=1e9)
  c.train.update(train_overrides)
  return c


def write_topic_corpus(directory: Path, num_docs: int = 24) -> Path:
  """Each document writes its sentences in one letter, in either case, shared with every
  sixth document: B comes from A's document when they share the letter (a random B does 3
  times in 23), a rule that holds in held-out documents too; a masked letter is predictable
  from its neighbours."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for d in range(num_docs):
    letters = [chr(ord('a') + d % 6), chr(ord('A') + d % 6)]
    sentences = ['\n'.join(''.join(rng.choice(letters, 6)) for _ in range(2)) for _ in range(10)]
    (directory / f'doc_{d:02d}.txt').write_text('\n\n'.join(sentences) + '\n')
  return directory


@pytest.mark.slow
def test_a_short_run_lifts_next_sentence_accuracy_above_chance(tmp_path, capsys):
  corpus_dir = write_topic_corpus(tmp_path / 'corpus')
  result = train.run(encoder_config(corpus_dir, tmp_path / 'cache'), tmp_path / 'run')
  assert result['val/nsp_accuracy'] > 0.8, result
  assert result['val/mlm_accuracy'] > result['val/mlm_mode_accuracy'] + 0.05, result
  out = capsys.readouterr().out
  assert 'next sentence' in out and "fill_mask('for i in ra[MASK]ge(n):')" in out
  cfg, params, tok = load.model(tmp_path / 'run')
  assert cfg.family == 'encoder'
  with pytest.raises(ConfigError, match='does not generate'):
    sample.run(sample.parse_args([f'--workdir={tmp_path / "run"}', '--prompt=a']))
  # fill_mask's probabilities are the softmax of the model's logits over the ordinary ids.
  text = 'abc[MASK]x[MASK]'
  filled = encoding.fill_mask(cfg, params, tok, text, top_k=3)
  ids = [tok.special_ids['cls'], *tok.encode('abc'), tok.special_ids['mask'], *tok.encode('x'),
         tok.special_ids['mask'], tok.special_ids['sep']]
  logits = np.asarray(models.build(cfg).apply({'params': params}, np.asarray([ids]))[0][0])
  for position, candidates in zip((4, 6), filled):
    probs = np.exp(logits[position, :256] - logits[position, :256].max())
    probs /= probs.sum()
    best = np.argsort(-probs)[:3]
    assert [c for c, _ in candidates] == [tok.decode([int(i)]) for i in best]
    np.testing.assert_allclose([p for _, p in candidates], probs[best], rtol=1e-4)
  # embed: each text as if alone, [CLS] state or the mean over its tokens.
  texts = ['abcd', 'efgh efgh efgh', '']
  cls_vectors = encoding.embed(cfg, params, tok, texts, pooling='cls')
  mean_vectors = encoding.embed(cfg, params, tok, texts, pooling='mean')
  assert cls_vectors.shape == (3, 64)
  for i, text in enumerate(texts):
    row = np.asarray([[tok.special_ids['cls'], *tok.encode(text), tok.special_ids['sep']]])
    hidden = np.asarray(models.build(cfg).apply({'params': params}, row,
                                                method=encoder.Encoder.encode))[0]
    np.testing.assert_allclose(cls_vectors[i], hidden[0], atol=1e-5)
    np.testing.assert_allclose(mean_vectors[i], hidden.mean(0), atol=1e-5)


def test_bad_encoder_input_gets_clear_errors(tmp_path):
  corpus_dir = write_topic_corpus(tmp_path / 'corpus', num_docs=4)
  cache = tmp_path / 'cache'
  bad = [({'data.mask_rate': 0.0}, 'data.mask_rate=0.0'),
         ({'data.mask_rate': 1.0}, 'data.mask_rate=1.0'),
         ({'data.seq_len': 4}, 'data.seq_len=4: .CLS. A .SEP. B .SEP. needs at least 5'),
         ({'data.task': 'clm'}, "data.task='clm': a model.family='encoder' trains on"),
         ({'model.window': 8}, "model.window=8: a key of the decoder family, and model.family='encoder'"),
         ({'model.num_segments': 1}, 'model.num_segments=1')]
  for overrides, message in bad:
    c = encoder_config(corpus_dir, cache)
    for key, value in overrides.items():
      section, name = key.split('.')
      c[section][name] = value
    with pytest.raises(ConfigError, match=message):
      train.setup(c, tmp_path / 'never')
  single = tmp_path / 'single'
  single.mkdir()
  (single / 'only.txt').write_text('a\nb\n\nc\nd\n')
  c = encoder_config(single, cache)
  c.data.val_fraction = 0.001
  with pytest.raises(ConfigError, match='no negative pair is possible'):
    train.setup(c, tmp_path / 'never')
  assert not (tmp_path / 'never' / 'checkpoints').exists()
  tok = tokenizers.load('bytes')
  cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
  params = models.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  with pytest.raises(ConfigError, match=r'holds no \[MASK\]'):
    encoding.fill_mask(cfg, params, tok, 'no mask here')
  with pytest.raises(ConfigError, match='pooling'):
    encoding.embed(cfg, params, tok, ['x'], pooling='max')
  for other in (models.EncDecConfig(vocab_size=tok.vocab_size),  # T5 also has an `encode`
                models.DecoderConfig(vocab_size=tok.vocab_size)):
    with pytest.raises(ConfigError, match=rf"model\.family='{other.family}': fill_mask and "
                                          r'embed need a model of a family with an encoding '
                                          r'interface \(encoder') as e:
      encoding.fill_mask(other, params, tok, 'a[MASK]')
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match='encoding interface'):
      encoding.embed(other, params, tok, ['x'])
  with pytest.raises(TypeError, match='post_norm'):  # each family's config has only its keys
    models.DecoderConfig(vocab_size=61, post_norm=True)
