"""Instruction tuning: packing by hand, packed logits equal each conversation alone, the loss
against numpy, the default conversation set, and a run that tunes an lm workdir."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import chat, models, objectives, tokenizers, train
from lm import config as config_lib
from lm.config import ConfigError
from lm.data import conversations, corpus
from lm.models import DecoderConfig
from lm.tasks import sft

from .conftest import ROOT, load_config, tiny_config

TOK = tokenizers.load('bytes')


def conversation(i: int) -> list[dict]:
  return [{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'a{i}'}]


def test_pack_fills_rows_in_order_and_cuts_what_is_longer_than_a_row():
  rendered = [(np.arange(1, 6), np.array([0, 0, 1, 1, 1], bool)),  # 5 tokens
              (np.arange(11, 15), np.array([0, 1, 1, 0], bool)),  # 4: not in what is left
              (np.arange(21, 23), np.array([0, 1], bool)),  # 2: fits after it
              (np.arange(31, 40), np.ones(9, bool))]  # 9 > 8: cut to 8
  tokens, learn, segments, positions, cut = sft.pack(rendered, row_len=8, pad_id=0)
  assert tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [11, 12, 13, 14, 21, 22, 0, 0],
                             [31, 32, 33, 34, 35, 36, 37, 38]]
  assert segments.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 2, 2, 0, 0], [1] * 8]
  assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 0, 1, 0, 0],
                                list(range(8))]
  assert learn.tolist()[1] == [False, True, True, False, False, True, False, False]
  assert cut == 1
  packed = sft.Packed(tokens, learn, segments, positions, [], cut, 0)
  ex = sft.example(packed, 1)  # no target of one conversation is predicted across the seam
  assert ex['loss_mask'].tolist() == [True, True, False, False, True, False, False]
  assert ex['segment_ids'].tolist() == [1, 1, 1, 1, 2, 2, 0]


def tiny_model():
  cfg = DecoderConfig(vocab_size=TOK.vocab_size, num_layers=2, d_model=32, num_heads=4,
                      num_kv_heads=2, mlp_dim=64, max_len=128, positions='rope', norm='rmsnorm',
                      mlp='swiglu', use_bias=False)
  model = models.build(cfg)
  return model, model.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))['params']


def test_packed_conversations_give_each_conversations_logits_and_the_numpy_loss():
  model, params = tiny_model()
  convs = [conversation(1), [{'role': 'system', 'content': 'S'}, *conversation(22)]]
  rendered = [chat.render(TOK, m) for m in convs]
  *arrays, cut = sft.pack(rendered, row_len=100, pad_id=TOK.pad_id)
  assert len(arrays[0]) == 1 and cut == 0  # both in one row
  ex = sft.example(sft.Packed(*arrays, convs, cut, 0), 0)
  batch = {k: v[None] for k, v in ex.items()}
  logits = np.asarray(model.apply({'params': params}, batch['inputs'],
                                  segment_ids=batch['segment_ids'],
                                  positions=batch['positions']))[0]
  start = 0
  for ids, _ in rendered:
    alone = np.asarray(model.apply({'params': params}, ids[None, :-1]))[0]
    np.testing.assert_allclose(logits[start:start + len(ids) - 1], alone, atol=1e-5)
    start += len(ids)
  loss, _ = objectives.clm_loss(params, batch, None, apply_fn=model.apply)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, ex['targets'][:, None], -1)[:, 0]
  mask = ex['loss_mask']
  want = nll[mask].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # exactly the assistant contents and their end-of-turn are learned
  learned = ex['targets'][mask]
  eot = TOK.special_ids['end_of_turn']
  assert TOK.decode(learned) == 'a1a22' and (learned == eot).sum() == 2


def test_the_default_conversations_are_deterministic_and_held_out_by_module():
  first = list(conversations.stdlib_conversations())
  assert first[:50] == list(conversations.stdlib_conversations())[:50]
  assert len(first) > 1000
  kinds = {(len(m), m[0]['role']) for _, m in first}
  assert kinds == {(2, 'user'), (3, 'system'), (4, 'user')}  # explain/write, system, follow-up
  splits = {}
  for split, key, _ in conversations.split_conversations((), 0.1):
    splits.setdefault(key, set()).add(split)
    assert split == ('val' if corpus.is_validation(key, 0.1) else 'train')
  assert all(len(s) == 1 for s in splits.values())
  for _, messages in first[:200]:
    chat.check(messages)


def write_conversations(path, count: int):
  path.write_text(''.join(json.dumps({'messages': conversation(i % 7)}) + '\n'
                          for i in range(count)))
  return path


@pytest.mark.slow
def test_sft_tunes_an_lm_workdir_and_reports_before_and_after(config, tmp_path, capsys):
  config.model.max_len = config.data.seq_len = 64  # room for a conversation and a reply
  config.train.steps = 40  # long enough that it has learned not to draw tokens it never saw
  train.run(config, tmp_path / 'base')
  c = tiny_config(tmp_path, tmp_path / 'cache', steps=60, learning_rate=1e-2, sample_len=4,
                  num_samples=1, eval_every=100)
  c.data.update(task='sft', paths=str(write_conversations(tmp_path / 'chat.jsonl', 80)),
                val_fraction=0.2, seq_len=64)
  c.model.max_len = 64
  c.train.init_from = str(tmp_path / 'base')
  result = train.run(c, tmp_path / 'sft')
  out = capsys.readouterr().out
  assert 'sft train:' in out and 'starting from the weights of' in out
  assert result['val/loss'] < result['val/base_loss']
  # the format is learned: the pretrained model never ends a turn, the tuned one nearly always
  assert result['val/base_eot_rate'] == 0.0 and result['val/eot_rate'] >= 0.75
  assert '[assistant]' in out
  metrics = [json.loads(line) for line in (tmp_path / 'sft' / 'metrics.jsonl').open()]
  assert {'val/base_loss', 'val/eot_rate', 'val/base_eot_rate'} <= set(metrics[-1])
  c.tokenizer.kind = 'cl100k'
  with pytest.raises(ConfigError, match=r"tokenizer.kind='cl100k': train.init_from=.* learned "
                                        r"with a bytes tokenizer"):
    train.setup(c, tmp_path / 'other')
  check_the_chat_cli(tmp_path / 'sft', tmp_path)


def check_the_chat_cli(workdir, tmp_path):
  """python -m lm.chat: piped turns, the second seeing the first, /system, /exit; its errors."""
  args = chat.parse_args([f'--workdir={workdir}', '--max_new_tokens=4'])
  out, err = io.StringIO(), io.StringIO()
  session = chat.run(args, iter(['q1\n', 'q2\n']), out, err)
  first, _ = out.getvalue().splitlines()
  want = [{'role': 'user', 'content': 'q1'}, {'role': 'assistant', 'content': first},
          {'role': 'user', 'content': 'q2'}]
  assert session.prompt.tolist() == chat.render(TOK, want, True)[0].tolist()
  args = chat.parse_args([f'--workdir={workdir}', '--max_new_tokens=4', '--system=S'])
  session = chat.run(args, iter(['q1\n', '/system T\n', 'q3\n', '/exit\n', 'never\n']), out, err)
  assert [m['content'] for m in session.messages[:2]] == ['T', 'q3'] and len(session.messages) == 3
  assert 'reset' in err.getvalue()
  proc = subprocess.run([sys.executable, '-m', 'lm.chat', f'--workdir={workdir}',
                         '--max_new_tokens=4'], input='q1\nq2\n', capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2, proc.stderr[-2000:]
  empty = tmp_path / 'empty'
  empty.mkdir()
  shutil.copy(workdir / 'config.json', empty / 'config.json')
  with pytest.raises(ConfigError, match='holds no checkpoint yet'):
    chat.run(chat.parse_args([f'--workdir={empty}']), iter([]))
  cfg = config_lib.parse(load_config('encoder'), vocab_size=269, device_count=1)
  (empty / 'config.json').write_text(cfg.to_json())
  with pytest.raises(ConfigError, match="model.family='encoder' does not generate text"):
    chat.run(chat.parse_args([f'--workdir={empty}']), iter([]))


def test_bad_conversation_files_name_the_file_and_line(tmp_path, config):
  path = tmp_path / 'chat.jsonl'
  c = tiny_config(tmp_path, tmp_path / 'cache')
  c.data.update(task='sft', paths=str(path))
  for line, message in (('not json', r'chat.jsonl:2: want an object with a "messages" list'),
                        ('{"text": "x"}', r'chat.jsonl:2: want an object'),
                        ('{"messages": [{"role": "bot", "content": "x"}]}',
                         r"chat.jsonl:2: messages\[0\].role='bot': use one of")):
    path.write_text(json.dumps({'messages': conversation(0)}) + '\n' + line + '\n')
    with pytest.raises(ConfigError, match=message):
      train.setup(c, tmp_path / 'never')
  assert not (tmp_path / 'never').exists()
