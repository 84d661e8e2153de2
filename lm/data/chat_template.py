"""The chat template: a conversation rendered as token ids with the loss mask of instruction
tuning (lm.tasks.sft trains on it; lm.chat talks through it).

  ids, loss_mask = render(tokenizer, [{'role': 'user', 'content': 'Hi'},
                                      {'role': 'assistant', 'content': 'Hello.'}])

The layout (Llama 3's, with lm's special tokens):

  <|begin_of_text|>
  <|start_header|> role <|end_header|> "\\n\\n" content <|end_of_turn|>    (every message)
  <|start_header|> assistant <|end_header|> "\\n\\n"                       (add_generation_prompt)

The role and the content are encoded as ordinary text, each on its own (the separator "\\n\\n"
too), so no message can forge a control token: a user who types "<|end_of_turn|>" gets the
bytes of that text. `loss_mask[i]` is True exactly on the tokens of each assistant message's
content and its <|end_of_turn|>: never on system, user or tool text, never on a header.

Roles: `system` (the first message only), `user`, `assistant`, `tool`. Tool use: an assistant
message may carry `tool_calls`, a list of `{"name": str, "arguments": {...}}`; each is rendered
after its content as one line `{"tool_call": {"name": ..., "arguments": ...}}` (JSON, keys
sorted), which `tool_calls_in` reads back from a reply, and the `tool` role's content is the
call's result.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from lm.errors import ConfigError

ROLES = ('system', 'user', 'assistant', 'tool')
SEPARATOR = '\n\n'  # after every header


def check(messages: Any, where: str = 'messages') -> None:
  """Raises ConfigError naming the message, the field and the fix."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ConfigError(f'{where}={messages!r}: give a non-empty list of '
                      '{"role": ..., "content": ...} messages')
  for i, m in enumerate(messages):
    at = f'{where}[{i}]'
    if not isinstance(m, dict) or not isinstance(m.get('role'), str):
      raise ConfigError(f'{at}={m!r}: a message is an object with "role" and "content"')
    if m['role'] not in ROLES:
      raise ConfigError(f'{at}.role={m["role"]!r}: use one of {ROLES}')
    if m['role'] == 'system' and i:
      raise ConfigError(f'{at}.role=\'system\': a system message comes first, and only once; '
                        'move it to the start')
    if not isinstance(m.get('content', ''), str):
      raise ConfigError(f'{at}.content={m.get("content")!r}: give the text as a string')
    calls = m.get('tool_calls', [])
    if calls and m['role'] != 'assistant':
      raise ConfigError(f'{at}.tool_calls: only an assistant message calls tools; '
                        'a tool\'s result is a message of role "tool"')
    for j, call in enumerate(calls):
      if not (isinstance(call, dict) and isinstance(call.get('name'), str)
              and isinstance(call.get('arguments', {}), dict)):
        raise ConfigError(f'{at}.tool_calls[{j}]={call!r}: give {{"name": str, '
                          '"arguments": {...}}')


def content_text(message: dict) -> str:
  """The text a message's content renders as: its content, then one JSON line a tool call."""
  lines = [json.dumps({'tool_call': {'name': c['name'], 'arguments': c.get('arguments', {})}},
                      sort_keys=True, ensure_ascii=False) for c in message.get('tool_calls', [])]
  return '\n'.join(([message['content']] if message.get('content') else []) + lines)


def tool_calls_in(reply: str) -> list[dict]:
  """The tool calls of an assistant reply's text (the lines content_text writes)."""
  calls = []
  for line in reply.splitlines():
    try:
      value = json.loads(line)
    except ValueError:
      continue
    if isinstance(value, dict) and isinstance(value.get('tool_call'), dict):
      calls.append(value['tool_call'])
  return calls


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
  """(ids_T int32, loss_mask_T bool) of a conversation; see the module docstring."""
  check(messages)
  special = tokenizer.special_ids
  sep = tokenizer.encode(SEPARATOR)
  ids, mask = [special['begin_of_text']], [False]

  def header(role: str) -> None:
    part = [special['start_header'], *tokenizer.encode(role), special['end_header'], *sep]
    ids.extend(part)
    mask.extend([False] * len(part))

  for m in messages:
    header(m['role'])
    body = [*tokenizer.encode(content_text(m)), special['end_of_turn']]
    ids.extend(body)
    mask.extend([m['role'] == 'assistant'] * len(body))
  if add_generation_prompt:
    header('assistant')
  return np.asarray(ids, np.int32), np.asarray(mask, bool)


# --- the chat loop -----------------------------------------------------------------------------
