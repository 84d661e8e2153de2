"""Chat rendering: exact ids and loss mask by hand, injection safety, tool calls, bad input."""
from __future__ import annotations

import pytest

from lm import chat, tokenizers
from lm.config import ConfigError
from lm.tokenizers import SPECIAL_TOKENS, special_text

TOK = tokenizers.load('bytes')
S = TOK.special_ids


def text(s: str) -> list[int]:
  return list(s.encode())  # the byte tokenizer's ids are the bytes


def test_render_gives_the_documented_ids_and_mask_for_every_role():
  call = {'name': 'lookup', 'arguments': {'q': 'os'}}
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'Hi'},
              {'role': 'assistant', 'content': 'Yes', 'tool_calls': [call]},
              {'role': 'tool', 'content': '42'},
              {'role': 'assistant', 'content': 'Ok'}]
  ids, mask = chat.render(TOK, messages)
  want_ids, want_mask = [S['begin_of_text']], [False]
  for role, content, learn in (
      ('system', 'Be brief.', False), ('user', 'Hi', False),
      ('assistant', 'Yes\n{"tool_call": {"arguments": {"q": "os"}, "name": "lookup"}}', True),
      ('tool', '42', False), ('assistant', 'Ok', True)):
    head = [S['start_header'], *text(role), S['end_header'], *text('\n\n')]
    body = [*text(content), S['end_of_turn']]
    want_ids += head + body
    want_mask += [False] * len(head) + [learn] * len(body)
  assert ids.tolist() == want_ids
  assert mask.tolist() == want_mask
  assert chat.tool_calls_in(chat.content_text(messages[2])) == [call]


def test_the_generation_prompt_ends_with_the_assistant_header_without_loss():
  ids, mask = chat.render(TOK, [{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True)
  tail = [S['start_header'], *text('assistant'), S['end_header'], *text('\n\n')]
  assert ids[-len(tail):].tolist() == tail
  assert not mask.any()


def test_no_message_can_forge_a_control_token():
  forged = ''.join(special_text(name) for name in SPECIAL_TOKENS)
  for role in ('system', 'user', 'tool'):
    messages = ([{'role': 'user', 'content': 'x'}] if role == 'tool' else []) + [
        {'role': role, 'content': forged}]
    ids, _ = chat.render(TOK, messages)
    structure = 1 + 3 * len(messages)  # begin_of_text, then start/end header and end_of_turn
    assert sum(int(i) >= TOK.first_special for i in ids) == structure
    assert TOK.decode(ids) == ''.join(f'{r}\n\n{m["content"]}' for r, m in
                                      ((m['role'], m) for m in messages))


@pytest.mark.parametrize('messages,message', [
    ([], 'give a non-empty list'),
    ([{'role': 'robot', 'content': 'x'}], r"messages\[0\]\.role='robot': use one of"),
    ([{'role': 'user', 'content': 'x'}, {'role': 'system', 'content': 'y'}],
     r"messages\[1\]\.role='system': a system message comes first"),
    ([{'role': 'user', 'content': 3}], r'messages\[0\]\.content=3: give the text as a string'),
    ([{'role': 'user', 'content': 'x', 'tool_calls': [{'name': 'f'}]}],
     r'messages\[0\]\.tool_calls: only an assistant message calls tools'),
    ([{'role': 'assistant', 'content': '', 'tool_calls': [{'arguments': {}}]}],
     r'messages\[0\]\.tool_calls\[0\]'),
    (['hello'], r"messages\[0\]='hello': a message is an object"),
])
def test_bad_messages_get_clear_errors(messages, message):
  with pytest.raises(ConfigError, match=message):
    chat.render(TOK, messages)


def turn(i: int) -> list[dict]:
  return [{'role': 'user', 'content': f'question {i}'},
          {'role': 'assistant', 'content': f'answer {i}'}]


def test_fit_drops_the_oldest_turns_and_keeps_the_system_message():
  system = {'role': 'system', 'content': 'S'}
  messages = [system, *turn(1), *turn(2), {'role': 'user', 'content': 'question 3'}]
  last = [system, {'role': 'user', 'content': 'question 3'}]
  budget = len(chat.render(TOK, last, True)[0]) + 5
  kept, dropped = chat.fit(TOK, messages, max_len=budget, reply_tokens=5)
  assert kept == last and dropped == 4
  whole = len(chat.render(TOK, messages, True)[0]) + 5
  assert chat.fit(TOK, messages, max_len=whole, reply_tokens=5) == (messages, 0)
  assert chat.fit(TOK, messages, max_len=None, reply_tokens=5) == (messages, 0)
  with pytest.raises(ConfigError, match='shorten it, or lower --max_new_tokens'):
    chat.fit(TOK, last, max_len=budget - 1, reply_tokens=5)


def test_a_session_keeps_the_conversation_as_context():
  import flax.linen as nn
  import jax
  from lm import models
  cfg = models.DecoderConfig(vocab_size=TOK.vocab_size, num_layers=1, d_model=16, num_heads=2,
                             mlp_dim=32, max_len=128)
  params = models.build(cfg).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), 'int32'))
  session = chat.Session(cfg, nn.meta.unbox(params['params']), TOK, system='Be brief.',
                         max_new_tokens=3)
  first = ''.join(session.say('hello'))
  notes = []
  second = ''.join(session.say('again', notes.append))
  want = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hello'},
          {'role': 'assistant', 'content': first}, {'role': 'user', 'content': 'again'}]
  assert session.prompt.tolist() == chat.render(TOK, want, True)[0].tolist()
  assert session.messages == [*want, {'role': 'assistant', 'content': second}] and not notes
  session.max_len = len(chat.render(TOK, want[:1] + want[-1:], True)[0]) + 3  # a tight context
  ''.join(session.say('again', notes.append))
  assert session.messages[0]['role'] == 'system' and len(session.messages) == 3
  assert notes and 'the system message is kept' in notes[0]
