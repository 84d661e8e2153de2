"""Sampling CLI: continue a prompt with a trained model.

  python -m lm.sample --workdir=runs/decoder --prompt='def ' [--max_new_tokens=100]
      [--temperature=0.8] [--top_k=50] [--top_p=0.95] [--min_p=0.05] [--seed=0] [--stream]
  python -m lm.sample --workdir=runs/decoder --prompt='import ' --num_beams=4
  python -m lm.sample --workdir=HF_MODEL_DIR --tokenizer=bytes|cl100k|DIR --prompt=...
  python -m lm.sample --workdir=runs/fim --prefix='def f(x):\n    return ' --suffix='\n'

--workdir is a run's directory (its config.json, tokenizer and latest checkpoint) or a Hugging
Face model directory (read by lm.hf.load; its tokenizer is named by --tokenizer). Every prompt
starts with the tokenizer's BOS, so an empty prompt samples from scratch. --prefix/--suffix
fill in the middle (lm.sampling.infill; a model trained with data.fim_rate) and print it. A
mistake in the arguments is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lm import load
from lm.errors import ConfigError, require


DEFAULT_NEW_TOKENS = 256  # --max_new_tokens=0 for a model without a context bound


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m lm.sample', description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True, help='a run directory or a Hugging Face directory')
  p.add_argument('--prompt', default='', help='text to continue (after BOS)')
  p.add_argument('--prefix', help='fill in the middle: the text before it (with --suffix)')
  p.add_argument('--suffix', help='fill in the middle: the text after it (with --prefix)')
  p.add_argument('--tokenizer', help='bytes | cl100k | DIR; default: the workdir\'s')
  p.add_argument('--max_new_tokens', type=int, default=0,
                 help='0: as many as fit the model context after the prompt (a model without '
                 f'one: {DEFAULT_NEW_TOKENS})')
  p.add_argument('--temperature', type=float, default=1.0, help='0 is greedy')
  p.add_argument('--top_k', type=int, default=0, help='0: off')
  p.add_argument('--top_p', type=float, default=1.0, help='1: off')
  p.add_argument('--min_p', type=float, default=0.0, help='0: off')
  p.add_argument('--num_beams', type=int, default=1, help='> 1: beam search')
  p.add_argument('--length_penalty', type=float, default=1.0, help='beam search only')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--stream', action='store_true', help='print text as it is drawn')
  p.add_argument('--truncate', action='store_true',
                 help='keep a too-long prompt\'s last tokens instead of refusing it')
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
  """Prints the prompt and its continuation; returns the continuation."""
  import jax
  from lm import sampling
  require(args.num_beams >= 1, 'num_beams', args.num_beams, 'must be an integer >= 1 (1 samples)')
  sampling_flags = (args.temperature, args.top_k, args.top_p, args.min_p) != (1.0, 0, 1.0, 0.0)
  if args.num_beams > 1 and (sampling_flags or args.stream):
    raise ConfigError(f'--num_beams={args.num_beams}: beam search is deterministic and whole; '
                      'drop --temperature/--top_k/--top_p/--min_p/--stream, or use --num_beams=1')
  infilling = args.prefix is not None or args.suffix is not None
  if infilling and (args.num_beams > 1 or args.stream or args.prompt):
    raise ConfigError('--prefix/--suffix fill in the middle: drop --prompt, --num_beams and '
                      '--stream')
  filter_fn = sampling.make_filter(args.temperature, args.top_k, args.top_p, args.min_p)
  from lm import models
  cfg, params, tok = load.model(Path(args.workdir), args.tokenizer)
  prompt = (sampling.infill_prompt(tok, args.prefix or '', args.suffix or '') if infilling
            else [tok.bos_id, *tok.encode(args.prompt)])
  if not args.max_new_tokens:
    room = models.decoding(cfg).new_tokens_room(len(prompt))
    args.max_new_tokens = max(1, DEFAULT_NEW_TOKENS if room is None else room)
  rng = jax.random.PRNGKey(args.seed)
  if infilling:
    middle = sampling.infill(cfg, params, tok, args.prefix or '', args.suffix or '',
                             max_new_tokens=args.max_new_tokens, rng=rng, filter_fn=filter_fn,
                             truncate=args.truncate)
    print(middle)
    return middle
  print(args.prompt, end='', flush=True)
  if args.stream:
    pieces = []
    for piece in sampling.stream(cfg, params, tok, prompt, max_new_tokens=args.max_new_tokens,
                                 rng=rng, filter_fn=filter_fn, truncate=args.truncate):
      print(piece, end='', flush=True)
      pieces.append(piece)
    print()
    return ''.join(pieces)
  if args.num_beams > 1:
    beams = sampling.beam_search(cfg, params, [prompt], num_beams=args.num_beams,
                                 max_new_tokens=args.max_new_tokens, eos_id=tok.eos_id,
                                 length_penalty=args.length_penalty, pad_id=tok.pad_id,
                                 truncate=args.truncate)
    text = tok.decode(beams.tokens[0])
    print(f'{text}\n[beam score {beams.scores[0]:.4f}]')
    return text
  out = sampling.generate(cfg, params, [prompt], max_new_tokens=args.max_new_tokens, rng=rng,
                          filter_fn=filter_fn, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          truncate=args.truncate)
  text = tok.decode(out.tokens[0])
  print(text)
  return text


def main(argv: list[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run(args)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
