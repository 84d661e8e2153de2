"""Chat: the chat loop over a tuned model, through the chat template (lm.data.chat_template,
whose `render`, `check` and `tool_calls_in` are also lm.chat's).

  python -m lm.chat --workdir=runs/sft [--system=TEXT] [--max_new_tokens=N] [--temperature=T]
      [--top_k=K] [--top_p=P] [--min_p=M] [--seed=S]

The loop keeps the conversation as context: each reply is streamed from the whole
conversation rendered with the generation prompt, until <|end_of_turn|> (or max_new_tokens).
When the conversation outgrows the model's context (with room for a reply), the oldest turns
are dropped, the system message kept, and a note says so on stderr. Commands: /reset (forget
the conversation), /system TEXT (set the system message and reset), /exit; end of input or
Ctrl-C leave cleanly. From a terminal it prompts with "> "; otherwise (piped input) it reads one
user message a line and prints each reply on its own line, so it can be scripted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from lm.data.chat_template import (ROLES, SEPARATOR, check, content_text, render,  # noqa: F401
                                   tool_calls_in)
from lm.errors import ConfigError, require

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
  from lm import load, models, sampling
  require(args.max_new_tokens >= 0, 'max_new_tokens', args.max_new_tokens, 'give >= 0')
  filter_fn = sampling.make_filter(args.temperature, args.top_k, args.top_p, args.min_p)
  models.decoding(load.model_config(Path(args.workdir)))  # a family that generates, first
  cfg, params, tokenizer = load.model(Path(args.workdir))
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
