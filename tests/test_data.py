"""Corpus listing and split, the token store, and the CLM windows and iterator."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lm import config as config_lib
from lm.config import ConfigError
from lm.data import corpus, store
from lm.tasks import clm
from lm.data.corpus import CorpusWarning
from lm import tokenizers
from tests.conftest import load_config, write_corpus

TOK = tokenizers.load("bytes")


def data_config(paths, cache_dir, **kw):
  c = load_config()
  c.data.update(paths=paths, cache_dir=str(cache_dir), **kw)
  return config_lib.parse(c, vocab_size=TOK.vocab_size, device_count=1).data


def test_default_corpus_is_the_stdlib_without_tests_in_a_stable_order():
  files = corpus.stdlib_files()
  keys = [f.key for f in files]
  assert keys == sorted(keys) and len(files) > 300
  assert 'os.py' in keys and 'json/decoder.py' in keys
  assert not any(set(k.split('/')[:-1]) & corpus.EXCLUDED_DIRS for k in keys)
  val = [k for k in keys if corpus.is_validation(k, 0.02)]
  assert 0 < len(val) < 0.06 * len(keys)


def test_glob_keys_are_relative_to_the_glob_root(tmp_path):
  for where in ('a', 'b/c'):
    write_corpus(tmp_path / where, num_files=2)
  assert ([f.key for f in corpus.glob_files([str(tmp_path / 'a' / '*.py')])]
          == [f.key for f in corpus.glob_files([str(tmp_path / 'b' / 'c' / '*.py')])]
          == ['file_00.py', 'file_01.py'])
  assert [f.key for f in corpus.glob_files([str(tmp_path / '**' / '*.py')])][0] == 'a/file_00.py'


def test_split_is_a_stable_hash_of_the_key():
  # Hand-computed: the first 8 bytes of sha256 as a fraction of 2**64.
  key = 'json/decoder.py'
  fraction = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64
  assert corpus.is_validation(key, fraction + 1e-9)
  assert not corpus.is_validation(key, fraction - 1e-9)


def test_store_frames_documents_and_counts_bytes(corpus, tmp_path):
  cfg = data_config(str(corpus / '*.py'), tmp_path / 'cache', val_fraction=0.25, seq_len=32)
  splits = store.load_or_build(cfg, TOK)
  files = sorted(corpus.glob('*.py'))
  val = [f for f in files if corpus_is_val(f, 0.25)]
  assert splits['val'].num_files == len(val) and splits['train'].num_files == len(files) - len(val)
  expected = np.concatenate([[TOK.bos_id, *TOK.encode(f.read_text()), TOK.eos_id] for f in val])
  np.testing.assert_array_equal(np.asarray(splits['val'].tokens), expected)
  assert splits['val'].num_bytes == sum(len(f.read_bytes()) for f in val)


def corpus_is_val(path: Path, fraction: float) -> bool:
  return corpus.is_validation(path.name, fraction)  # the key: relative to the glob's root


def test_store_is_cached_by_fingerprint(corpus, tmp_path, monkeypatch):
  cfg = data_config(str(corpus / '*.py'), tmp_path / 'cache', val_fraction=0.25, seq_len=32)
  store.load_or_build(cfg, TOK)
  monkeypatch.setattr(store, '_build', lambda *a: pytest.fail('rebuilt a cached store'))
  store.load_or_build(cfg, TOK)
  (corpus / 'file_00.py').write_text('changed\n' * 50)  # a new fingerprint
  with pytest.raises(pytest.fail.Exception):
    store.load_or_build(cfg, TOK)
  assert not list((tmp_path / 'cache').glob('.building-*'))


def test_path_that_matches_nothing(tmp_path):
  cfg = data_config(str(tmp_path / 'nope' / '*.txt'), tmp_path / 'cache')
  with pytest.raises(ConfigError, match=r"data\.paths='.*nope/\*\.txt': matches no file"):
    store.load_or_build(cfg, TOK)


def test_empty_corpus(tmp_path):
  for i in range(3):
    (tmp_path / f'{i}.txt').write_text('')
  cfg = data_config(str(tmp_path / '*.txt'), tmp_path / 'cache')
  with pytest.raises(ConfigError, match=r'data\.paths=.*holds no text'):
    store.load_or_build(cfg, TOK)


def test_binary_file_is_skipped_with_a_warning(corpus, tmp_path):
  (corpus / 'zz_binary.py').write_bytes(b'\x89PNG\r\n\x1a\n\0\0\0' + bytes(range(256)))
  (corpus / 'zz_latin1.py').write_bytes('caf\xe9\n'.encode('latin-1'))
  cfg = data_config(str(corpus / '*.py'), tmp_path / 'cache', val_fraction=0.25, seq_len=32)
  with pytest.warns(CorpusWarning, match='zz_binary.py: not UTF-8') as record:
    splits = store.load_or_build(cfg, TOK)
  assert any('zz_latin1.py' in str(w.message) for w in record)
  assert splits['train'].num_files + splits['val'].num_files == 24


def test_jsonl_documents_and_bad_lines(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"text": "one"}\n\n{"text": 2}\nnot json\n{"text": "two"}\n')
  with pytest.warns(corpus.CorpusWarning) as record:
    docs = list(corpus.read_documents(corpus.SourceFile('docs.jsonl', path)))
  assert docs == ['one', 'two'] and len(record) == 2


def test_split_too_small_for_one_window(corpus, tmp_path):
  cfg = data_config(str(corpus / 'file_0[13].py'), tmp_path / 'cache', val_fraction=0.25)
  with pytest.raises(ConfigError, match=r'split .* fewer than data\.seq_len \+ 1'):
    store.load_or_build(cfg, TOK)


def test_windows_are_shifted_targets():
  tokens = np.arange(100, dtype=np.uint16)
  w = clm.window(tokens, 2, 8)
  np.testing.assert_array_equal(w['inputs'], np.arange(16, 24))
  np.testing.assert_array_equal(w['targets'], np.arange(17, 25))
  assert clm.num_windows(100, 8) == 12


def take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_are_deterministic_shuffled_and_resumable():
  tokens = np.arange(1000, dtype=np.uint16)
  make = lambda seed: iter(clm.train_dataset(tokens, seq_len=10, batch_size=4, seed=seed))
  a, b = take(make(0), 30), take(make(0), 30)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  starts = [int(x['inputs'][i, 0]) // 10 for x in a for i in range(4)]
  assert sorted(starts[:96]) != starts[:96]  # shuffled
  epoch1, epoch2 = starts[:96], starts[96:]  # 99 windows, 24 batches an epoch (drop remainder)
  assert sorted(set(starts[:99])) == list(range(99))
  assert epoch1[:20] != epoch2[:20]  # a new order each epoch
  assert take(make(1), 1)[0]['inputs'].tolist() != a[0]['inputs'].tolist()
  it = make(0)
  take(it, 7)
  state = it.get_state()
  resumed = make(0)
  resumed.set_state(state)
  for x, y in zip(take(resumed, 5), a[7:12]):
    np.testing.assert_array_equal(x['targets'], y['targets'])


def test_hosts_get_disjoint_shares():
  tokens = np.arange(1000, dtype=np.uint16)
  shares = [next(iter(clm.train_dataset(tokens, seq_len=10, batch_size=8, seed=0,
                                        process_index=p, process_count=2)))['inputs'][:, 0]
            for p in range(2)]
  assert shares[0].shape == (4,) and not set(shares[0]) & set(shares[1])


def test_eval_batches_cover_the_split_and_pad():
  tokens = np.arange(1, 102, dtype=np.uint16)
  batches = clm.eval_batches(tokens, seq_len=10, batch_size=4, pad_id=0)
  assert len(batches) == 3
  targets = np.concatenate([b['targets'] for b in batches]).ravel()
  np.testing.assert_array_equal(targets[:100], np.arange(2, 102))
  assert (targets[100:] == 0).all()
  spread = clm.eval_batches(tokens, seq_len=10, batch_size=2, pad_id=0, max_batches=1)
  assert [r[0] for r in spread[0]['inputs']] == [1, 91]


@pytest.mark.parametrize('num_tokens,seq_len,stride', [(101, 8, 3), (101, 8, 8), (33, 8, 1),
                                                       (97, 16, 5)])
def test_strided_windows_score_the_plain_targets_once_each_with_the_context_promised(
    num_tokens, seq_len, stride):
  tokens = np.arange(num_tokens)
  batches = clm.strided_eval_batches(tokens, seq_len=seq_len, stride=stride, batch_size=4,
                                     pad_id=-1)
  scored, context = [], []
  for batch in batches:
    for inputs, targets, mask in zip(batch['inputs'], batch['targets'], batch['loss_mask']):
      np.testing.assert_array_equal(targets[:-1], inputs[1:])  # shifted, as in training
      for position in np.flatnonzero(mask):
        scored.append(int(targets[position]))
        context.append((int(targets[position]), position + 1))  # tokens before it in the window
  plain = [int(t) for b in clm.eval_batches(tokens, seq_len=seq_len, batch_size=4, pad_id=-1)
           for t in b['targets'][b['loss_mask']]]
  assert sorted(scored) == plain  # the same targets as the plain windows, each once
  assert all(before >= seq_len - stride for target, before in context if target > seq_len)
  if stride == seq_len:  # no overlap: the plain windows themselves
    assert scored == plain


def test_eval_stride_out_of_range_is_refused():
  c = load_config()
  c.eval.stride = -1
  with pytest.raises(ConfigError, match=r'eval.stride=-1: give 0 \(no strided figure\) or a '
                                        r'step in tokens, under data.seq_len'):
    config_lib.parse(c, vocab_size=2048, device_count=1)
