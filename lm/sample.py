"""Sampling CLI: continue a prompt with a trained model.

  python -m lm.sample --workdir=runs/decoder --prompt='def ' [--max_new_tokens=100]
      [--temperature=0.8] [--top_k=50] [--top_p=0.95] [--min_p=0.05] [--seed=0] [--stream]
  python -m lm.sample --workdir=runs/decoder --prompt='import ' --num_beams=4
  python -m lm.sample --workdir=HF_MODEL_DIR --tokenizer=bytes|cl100k|DIR --prompt=...

--workdir is a run's directory (its config.json, tokenizer and latest checkpoint) or a Hugging
Face model directory (read by lm.hf.load; its tokenizer is named by --tokenizer). Every prompt
starts with the tokenizer's BOS, so an empty prompt samples from scratch. A mistake in the
arguments is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm.config import ConfigError, ModelConfig, require, validate_model


def load_model(workdir: Path, tokenizer_arg: str | None):
  """(ModelConfig, params, tokenizer) of a run's workdir or a Hugging Face directory."""
  from lm import hf, tokenizers
  config_path = workdir / 'config.json'
  if not config_path.is_file():
    raise ConfigError(f'--workdir={str(workdir)!r}: no config.json; give a run directory of '
                      'python -m lm.main, or a Hugging Face model directory')
  saved = json.loads(config_path.read_text())
  if 'model_type' in saved:  # a Hugging Face directory
    if not tokenizer_arg and not (workdir / 'tokenizer' / 'tokenizer.json').is_file():
      raise ConfigError(f'--workdir={str(workdir)!r} is a Hugging Face directory: name its '
                        'tokenizer with --tokenizer=bytes|cl100k|DIR')
    cfg, params = hf.load(workdir)
    return cfg, params, tokenizers.load(tokenizer_arg or workdir / 'tokenizer')
  cfg = ModelConfig(**saved['model'])
  validate_model(cfg)
  return cfg, restore_params(workdir), tokenizers.load(tokenizer_arg or workdir / 'tokenizer')


def restore_params(workdir: Path):
  """The parameters of the latest checkpoint of a run."""
  import orbax.checkpoint as ocp
  directory = (workdir / 'checkpoints').absolute()
  step = ocp.CheckpointManager(directory).latest_step() if directory.is_dir() else None
  if step is None:
    raise ConfigError(f'--workdir={str(workdir)!r}: holds no checkpoint yet; train first '
                      f'(python -m lm.main --config=... --workdir={workdir}) or wait for its '
                      'first checkpoint')
  with ocp.CheckpointManager(directory) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']['params']


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m lm.sample', description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True, help='a run directory or a Hugging Face directory')
  p.add_argument('--prompt', default='', help='text to continue (after BOS)')
  p.add_argument('--tokenizer', help='bytes | cl100k | DIR; default: the workdir\'s')
  p.add_argument('--max_new_tokens', type=int, default=0,
                 help='0: as many as fit the model context after the prompt')
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
  filter_fn = sampling.make_filter(args.temperature, args.top_k, args.top_p, args.min_p)
  cfg, params, tok = load_model(Path(args.workdir), args.tokenizer)
  prompt = [tok.bos_id, *tok.encode(args.prompt)]
  if not args.max_new_tokens:
    args.max_new_tokens = max(1, cfg.max_len - len(prompt))
  rng = jax.random.PRNGKey(args.seed)
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
