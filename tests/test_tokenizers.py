"""Tokenizers: bytes, a trained BPE through tiktoken, cl100k; special tokens, streaming, the CLI."""
from __future__ import annotations

import json
import socket
import string

import pytest
from hypothesis import given, settings, strategies as st

from lm import tokenizers
from lm.config import ConfigError
from lm.data import corpus
from lm.data.corpus import CorpusWarning
from lm.tokenizers import SPECIAL_TOKENS, StreamDecoder, bpe
from lm.tokenizers.__main__ import main as cli

SMALL_TEXTS = [
    'the cat sat on the mat; the cat ate.\n', 'aaaa aaa aa a  bbb ab ba abab\n',
    'def f(x):\n    return x + 1  # 123 4567\n', "it's we'll they've I'D\n",
    'naïve café ünïcödé € 😀 日本語のテキスト\n', '\0 nul and a lone \ud800 surrogate\n',
] * 3


@pytest.fixture(scope='module')
def small_bpe() -> tokenizers.Tokenizer:
  return bpe.train(SMALL_TEXTS, 256 + 60 + len(SPECIAL_TOKENS))


@pytest.fixture(scope='module')
def kinds(small_bpe) -> dict[str, tokenizers.Tokenizer]:
  return {'bytes': tokenizers.load('bytes'), 'bpe': small_bpe, 'cl100k': tokenizers.load('cl100k')}


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=('Cs',))))
def test_round_trip_of_any_unicode_in_every_kind(kinds, text):
  for tokenizer in kinds.values():
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_reference_and_rustbpe_learn_the_same_merges_with_ties():
  # Many pairs tie at every count here, so the tie-break rule decides most merges.
  texts = SMALL_TEXTS + [' '.join(string.ascii_lowercase[i:i + 3] for i in range(24))]
  merges = bpe.train_reference(texts, 80)
  assert len(merges) == 80
  assert bpe.train(texts, 256 + 80 + len(SPECIAL_TOKENS)).ranks == bpe.merges_to_ranks(merges)


def test_reference_trainer_by_hand():
  # 'aaab' x2, 'ab' x1: (a,a) 4, (a,b) 3 -> merge (a,a)=256: 'aa a b' -> (256,97) 2, (97,98) 3
  assert bpe.train_reference(['aaab aaab ab'], 3, pattern=r'\S+') == [(97, 97), (97, 98),
                                                                        (256, 257)]
  # a tie between (98,99) and (97,98), both count 1: the smaller pair wins
  assert bpe.train_reference(['abc'], 1, pattern=r'\S+') == [(97, 98)]


def test_tiktoken_ids_equal_rustbpe_ids_on_the_whole_default_corpus():
  texts = [doc for f in corpus.stdlib_files() for doc in corpus.read_documents(f)]
  trainer = bpe.train_rustbpe(texts, 8192 - len(SPECIAL_TOKENS))
  tokenizer = bpe.from_rustbpe(trainer, 8192)
  assert tokenizer.encode_batch(texts) == trainer.batch_encode(texts)
  assert all(tokenizer.ranks[bytes([b])] == b for b in range(256))


def test_cl100k_encodes_hello_world_with_no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError('network is off in this test')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  tokenizer = tokenizers.load('cl100k')
  assert tokenizer.encode('hello world') == [15339, 1917]
  assert tokenizer.vocab_size == 100277 + len(SPECIAL_TOKENS)


def test_special_ids_are_fixed_and_documented(kinds):
  firsts = {'bytes': 256, 'bpe': 256 + 60, 'cl100k': 100277}
  for kind, tokenizer in kinds.items():
    assert tokenizer.special_ids == {n: firsts[kind] + i for i, n in enumerate(SPECIAL_TOKENS)}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == tuple(
        firsts[kind] + i for i in range(3))
    assert tokenizer.vocab_size == firsts[kind] + 13 + 100  # named specials, sentinels
    assert tokenizer.token_bytes()[tokenizer.first_special:].sum() == 0


def test_special_token_text_in_user_text_is_ordinary_text(kinds):
  for tokenizer in kinds.values():
    for name in SPECIAL_TOKENS:
      text = f'user says {tokenizers.special_text(name)} here'
      ids = tokenizer.encode(text)
      assert max(ids) < tokenizer.first_special
      assert tokenizer.decode(ids) == text
    # A template puts special tokens in by id; decode drops them.
    ids = [tokenizer.special_ids['begin_of_text'], *tokenizer.encode('hi'),
           tokenizer.special_ids['end_of_turn']]
    assert tokenizer.decode(ids) == 'hi'


def test_streaming_yields_a_split_character_once_and_whole(kinds):
  for tokenizer in kinds.values():
    text = 'a€😀日本b'
    ids = [b for b in text.encode()] if tokenizer.kind == 'bytes' else tokenizer.encode(text)
    stream = StreamDecoder(tokenizer)
    pieces = [stream.feed([i]) for i in ids] + [stream.flush()]
    assert ''.join(pieces) == text
    assert all('\ufffd' not in p for p in pieces)
  stream = StreamDecoder(kinds['bytes'])
  assert [stream.feed([b]) for b in '€'.encode()] == ['', '', '€']
  assert stream.feed([0xE2, 0x82]) == '' and stream.flush() == '\ufffd'


def test_invalid_utf8_decodes_with_replacement(kinds):
  tokenizer = kinds['bytes']
  assert tokenizer.decode([0xE2, 0x82]) == '\ufffd'
  assert tokenizer.decode([0xFF, 97]) == '\ufffda'
  with pytest.raises(ValueError, match='token id 369 is outside'):
    tokenizer.decode([369])


def test_lone_surrogates_and_nul_bytes(kinds):
  for tokenizer in kinds.values():
    assert tokenizer.decode(tokenizer.encode('a\ud800b')) == 'a\ufffdb'
    assert tokenizer.decode(tokenizer.encode('a\0b')) == 'a\0b'
  assert bpe.train_reference(['x\ud800y'], 1, pattern=r'\S+') == [(120, 239)]  # U+FFFD: EF BF BD


def test_save_and_load_every_kind(kinds, tmp_path):
  for kind, tokenizer in kinds.items():
    tokenizer.save(tmp_path / kind)
    loaded = tokenizers.load(tmp_path / kind)
    assert loaded.fingerprint() == tokenizer.fingerprint() and loaded.kind == kind
    assert loaded.encode('def f(x): return 1') == tokenizer.encode('def f(x): return 1')
  assert (tmp_path / 'bpe' / 'ranks.tiktoken').is_file()
  assert not (tmp_path / 'cl100k' / 'ranks.tiktoken').exists()


def test_missing_or_corrupt_tokenizer_directory(small_bpe, tmp_path):
  with pytest.raises(ConfigError, match='not bytes, cl100k, nor a directory'):
    tokenizers.load(tmp_path / 'nothing')
  with pytest.raises(ConfigError, match='a bpe is trained first'):
    tokenizers.load('bpe')
  small_bpe.save(tmp_path / 'tok')
  (tmp_path / 'tok' / 'ranks.tiktoken').unlink()
  with pytest.raises(ConfigError, match='corrupt or incomplete.*ranks.tiktoken'):
    tokenizers.load(tmp_path / 'tok')
  small_bpe.save(tmp_path / 'tok')
  ranks = tmp_path / 'tok' / 'ranks.tiktoken'
  ranks.write_bytes(ranks.read_bytes()[:-40])  # truncated
  with pytest.raises(ConfigError, match='corrupt or incomplete'):
    tokenizers.load(tmp_path / 'tok')
  ranks.write_bytes(b'!!notbase64 3\n')
  with pytest.raises(ConfigError, match='corrupt or incomplete'):
    tokenizers.load(tmp_path / 'tok')
  (tmp_path / 'tok' / 'tokenizer.json').write_text('{not json')
  with pytest.raises(ConfigError, match='corrupt or incomplete'):
    tokenizers.load(tmp_path / 'tok')


def test_bad_vocab_sizes_and_an_empty_corpus():
  with pytest.raises(ConfigError, match='vocab_size=368: .* use 369 or more'):
    bpe.train(SMALL_TEXTS, 368)
  with pytest.raises(ConfigError, match='tokenizer.vocab_size=100'):
    tokenizers.vocab_size_of('bpe', 100)
  with pytest.raises(ConfigError, match="tokenizer.kind='gpt2'"):
    tokenizers.vocab_size_of('gpt2', 100)
  with pytest.raises(ConfigError, match='empty'):
    bpe.train([], 400)
  with pytest.raises(ConfigError, match='only .* merges to learn; use a vocab_size of at most'):
    bpe.train(['ab ab'], 5000)


def test_cli_train_then_stats(tmp_path, capsys):
  (tmp_path / 'text').mkdir()
  for i, text in enumerate(SMALL_TEXTS[:6]):
    (tmp_path / 'text' / f'{i}.txt').write_text(text.replace('\ud800', '?'))
  (tmp_path / 'text' / 'blob.txt').write_bytes(b'\x89PNG\0\0binary')
  (tmp_path / 'text' / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  with pytest.warns(CorpusWarning, match='skipping'):
    assert cli(['train', f'--input={tmp_path}/text/*.txt', '--vocab_size=400',
                f'--out={tmp_path}/tok']) == 0
  # The file holding a NUL byte counts as binary too: 5 of the 6 text files are read.
  assert 'trained a bpe of 400 ids on 5 documents' in capsys.readouterr().out
  with pytest.warns(CorpusWarning):
    assert cli(['stats', f'--tokenizer={tmp_path}/tok', f'--input={tmp_path}/text/*.txt',
                '--top=3']) == 0
  out = capsys.readouterr().out
  assert 'bytes per token' in out and 'unused ids' in out and 'longest tokens' in out
  assert tokenizers.load(tmp_path / 'tok').vocab_size == 400


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert cli(['train', '--vocab_size=10', f'--out={tmp_path}/t']) == 2
  assert capsys.readouterr().err.startswith('error: --vocab_size=10:')
  assert cli(['train', f'--input={tmp_path}/none/*.txt', '--vocab_size=400',
              f'--out={tmp_path}/t']) == 2
  assert "--input=" in capsys.readouterr().err
  (tmp_path / 'empty.txt').write_text('')
  assert cli(['train', f'--input={tmp_path}/empty.txt', '--vocab_size=400',
              f'--out={tmp_path}/t']) == 2
  assert 'empty' in capsys.readouterr().err
  assert cli(['stats', f'--tokenizer={tmp_path}/nothing']) == 2
  assert not (tmp_path / 't').exists()


def test_header_records_the_special_ids(small_bpe, tmp_path):
  small_bpe.save(tmp_path / 'tok')
  header = json.loads((tmp_path / 'tok' / 'tokenizer.json').read_text())
  assert header['special_tokens']['<|mask|>'] == small_bpe.special_ids['mask']
  assert header['kind'] == 'bpe' and header['vocab_size'] == small_bpe.vocab_size
