"""The byte tokenizer and the tokenizer interface."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from lm import tokenizers
from lm.config import ConfigError
from lm.tokenizers.bytes import ByteTokenizer

TOK = ByteTokenizer()


@given(st.text())
def test_round_trip_of_any_text_without_surrogates(text):
  text = text.encode('utf-8', 'replace').decode('utf-8')
  assert TOK.decode(TOK.encode(text)) == text


def test_special_token_text_is_ordinary_bytes_and_special_ids_are_fixed():
  assert (TOK.bos_id, TOK.eos_id, TOK.pad_id, TOK.vocab_size) == (256, 257, 258, 259)
  ids = TOK.encode('<|eos|>')
  assert ids == list(b'<|eos|>') and max(ids) < 256
  assert TOK.decode([TOK.bos_id, *ids, TOK.eos_id]) == '<|eos|>'


def test_invalid_utf8_decodes_with_replacement_and_lone_surrogates_encode():
  assert TOK.decode([0xE2, 0x82]) == '\ufffd'
  assert TOK.decode(TOK.encode('a\ud800b')) == 'a?b'
  assert TOK.token_bytes().sum() == 256


def test_save_and_load(tmp_path):
  TOK.save(tmp_path / 'tok')
  assert tokenizers.load(tmp_path / 'tok').kind == 'bytes'
  assert tokenizers.load('bytes').vocab_size == 259


def test_missing_or_corrupt_tokenizer_directory(tmp_path):
  with pytest.raises(ConfigError, match='not a kind .* nor a directory'):
    tokenizers.load(tmp_path / 'nothing')
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'tokenizer.json').write_text('{not json')
  with pytest.raises(ConfigError, match='corrupt'):
    tokenizers.load(tmp_path / 'bad')
