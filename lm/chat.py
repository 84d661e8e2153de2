"""Chat: a conversation rendered as token ids with the loss mask of instruction tuning, and
the chat loop.

  ids, loss_mask = render(tokenizer, [{'role': 'user', 'content': 'Hi'},
                                      {'role': 'assistant', 'content': 'Hello.'}])

  python -m lm.chat --workdir=runs/sft [--system=TEXT] [--max_new_tokens=N] [--temperature=T]
      [--top_k=K] [--top_p=P] [--min_p=M] [--seed=S]

The loop keeps the conversation as context: each reply is streamed from the whole
conversation rendered with the generation prompt, until <|end_of_turn|> (or max_new_tokens).
When the conversation outgrows the model's context (with room for a reply), the oldest turns
are dropped, the system message kept, and a note says so on stderr. Commands: /reset (forget
the conversation), /system TEXT (set the system message and reset), /exit; end of input or
Ctrl-C leave cleanly. From a terminal it prompts with "> "; otherwise (piped input) it reads one
user message a line and prints each reply on its own line, so it can be scripted.

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

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lm.config import ConfigError, require

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

DEFAULT_NEW_TOKENS = 256  # a reply's budget when the model's context does not bound it


def fit(tokenizer, messages: list[dict], max_len: int | None, reply_tokens: int
        ) -> tuple[list[dict], int]:
  """(messages whose rendering with the generation prompt leaves `reply_tokens` of max_len,
  the number of oldest messages dropped to get there); the system message is always kept."""
  system = messages[:1] if messages and messages[0]['role'] == 'system' else []
  rest, dropped = messages[len(system):], 0
  while max_len is not None and len(render(tokenizer, system + rest, True)[0]) + reply_tokens \
      > max_len:
    if len(rest) <= 1:
      raise ConfigError(f'the message is {len(render(tokenizer, system + rest, True)[0])} '
                        f'tokens with the system message and headers, and the model\'s context of '
                        f'{max_len} must leave {reply_tokens} for the reply: shorten it, or lower '
                        '--max_new_tokens')
    cut = next((i for i in range(1, len(rest)) if rest[i]['role'] == 'user'), len(rest) - 1)
    rest, dropped = rest[cut:], dropped + cut  # whole turns: up to the next user message
  return system + rest, dropped


class Session:
  """A conversation with a model: `say(text)` streams the reply and keeps both turns."""

  def __init__(self, cfg, params, tokenizer, *, system: str = '', max_new_tokens: int = 0,
               filter_fn=None, seed: int = 0):
    import jax
    from lm import models, sampling
    self.cfg, self.tokenizer, self.system = cfg, tokenizer, system
    self.params = params
    self.max_len = models.decoding(cfg).max_len
    self.max_new_tokens = max_new_tokens or (min(DEFAULT_NEW_TOKENS, self.max_len // 2)
                                             if self.max_len else DEFAULT_NEW_TOKENS)
    self.filter_fn = filter_fn or sampling.GREEDY
    self.rng = jax.random.PRNGKey(seed)
    self.turn = 0
    self.reset()

  def reset(self) -> None:
    self.messages = [{'role': 'system', 'content': self.system}] if self.system else []

  def say(self, text: str, note=lambda line: None) -> Iterator[str]:
    """Yields the reply's text as it is drawn; `note(line)` hears of dropped turns."""
    import jax
    from lm import sampling
    messages, dropped = fit(self.tokenizer, [*self.messages, {'role': 'user', 'content': text}],
                            self.max_len, self.max_new_tokens)
    if dropped:
      note(f'[dropped the oldest {dropped} messages to fit the model\'s context of '
           f'{self.max_len} tokens; the system message is kept]')
    self.messages = messages
    self.prompt, _ = render(self.tokenizer, messages, add_generation_prompt=True)
    pieces = []
    for piece in sampling.stream(self.cfg, self.params, self.tokenizer, self.prompt.tolist(),
                                 max_new_tokens=self.max_new_tokens, filter_fn=self.filter_fn,
                                 rng=jax.random.fold_in(self.rng, self.turn),
                                 stop_id=self.tokenizer.special_ids['end_of_turn']):
      pieces.append(piece)
      yield piece
    self.turn += 1
    self.messages.append({'role': 'assistant', 'content': ''.join(pieces)})


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m lm.chat', description='Chat with a tuned model.')
  p.add_argument('--workdir', required=True, help='a run directory (e.g. runs/sft)')
  p.add_argument('--system', default='', help='the system message')
  p.add_argument('--max_new_tokens', type=int, default=0,
                 help=f'a reply\'s budget; 0: half the context, at most {DEFAULT_NEW_TOKENS}')
  p.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
  p.add_argument('--top_k', type=int, default=0, help='0: off')
  p.add_argument('--top_p', type=float, default=1.0, help='1: off')
  p.add_argument('--min_p', type=float, default=0.0, help='0: off')
  p.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def run(args: argparse.Namespace, lines, out=sys.stdout, err=sys.stderr,
        interactive: bool = False) -> Session:
  """The loop over `lines` (user messages and commands); returns the session."""
  from lm import models, sampling
  from lm.checkpoint import load_model, saved_model
  require(args.max_new_tokens >= 0, 'max_new_tokens', args.max_new_tokens, 'give >= 0')
  filter_fn = sampling.make_filter(args.temperature, args.top_k, args.top_p, args.min_p)
  models.decoding(saved_model(Path(args.workdir)))  # a family that generates, before the weights
  cfg, params, tokenizer = load_model(Path(args.workdir))
  session = Session(cfg, params, tokenizer, system=args.system,
                    max_new_tokens=args.max_new_tokens, filter_fn=filter_fn, seed=args.seed)
  note = lambda line: print(line, file=err, flush=True)
  while True:
    if interactive:
      print('> ', end='', file=out, flush=True)
    line = next(lines, None)
    if line is None:
      return session
    text = line.rstrip('\n')
    if text == '/exit':
      return session
    if text == '/reset' or text.startswith('/system'):
      if text.startswith('/system'):
        session.system = text[len('/system'):].strip()
      session.reset()
      note('[the conversation is reset]')
      continue
    if not text.strip():
      continue
    try:
      for piece in session.say(text, note):
        print(piece, end='', file=out, flush=True)
    except ConfigError as e:  # a message too long for the context: say so and go on
      note(f'[{e}]')
      continue
    print(file=out, flush=True)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run(args, iter(sys.stdin), interactive=sys.stdin.isatty())
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(file=sys.stderr)


if __name__ == '__main__':
  main()
