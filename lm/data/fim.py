"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle") as a transform of causal training windows.

Each document fragment of a window (a run of ordinary tokens between the store's BOS/EOS: a
whole document, or the part of one the window holds; the paper's context-level FIM) is, with
probability data.fim_rate, decoded, cut at two positions drawn uniformly (sorted) into
prefix, middle and suffix: any two characters' positions (data.fim_unit='char', the
paper's), or two line starts (data.fim_unit='line': the middle is whole lines, as when a line
or a block of code is written between the code before and after it), and laid out

  PSM:  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
  SPM:  <|fim_suffix|> suffix <|fim_prefix|> prefix <|fim_middle|> middle   (data.fim_spm_rate)

each part encoded as ordinary text. The document's EOS, where the window holds it, follows
the middle, so a model learns to end a middle with EOS. The window keeps its length: what the
sentinels push past its end is dropped, and a window that came out shorter is padded (no loss
there). The draw is grain's per-element generator (the seed and the element's index over all
epochs), so each epoch draws afresh, a seed repeats it exactly, and a resumed run continues it.
"""
from __future__ import annotations

import numpy as np


UNITS = ('char', 'line')


def cut_points(text: str, unit: str) -> list[int]:
  """The positions a cut may fall at: every one in [0, len(text)] ('char'), or the start and
  the end of the text and the start of each of its lines ('line')."""
  if unit == 'char':
    return list(range(len(text) + 1))
  starts = [i + 1 for i, ch in enumerate(text[:-1]) if ch == '\n']
  return [0, *starts, len(text)] if text else [0]


def cut(text: str, rng: np.random.Generator, unit: str = 'char') -> tuple[str, str, str]:
  """(prefix, middle, suffix) at two of cut_points(text, unit) drawn uniformly (sorted); a
  character cut draws the positions themselves, without listing them."""
  if unit == 'char':
    i, j = sorted(rng.integers(0, len(text) + 1, size=2))
  else:
    points = cut_points(text, unit)
    i, j = sorted(points[k] for k in rng.integers(0, len(points), size=2))
  return text[:i], text[i:j], text[j:]


def arrange(tokenizer, prefix: str, middle: str, suffix: str, spm: bool) -> list[int]:
  """The ids of one fragment laid out PSM (or SPM): see the module docstring."""
  s = tokenizer.special_ids
  pre = [s['fim_prefix'], *tokenizer.encode(prefix)]
  suf = [s['fim_suffix'], *tokenizer.encode(suffix)]
  return [*(suf + pre if spm else pre + suf), s['fim_middle'], *tokenizer.encode(middle)]


def transform(tokens_R: np.ndarray, rng: np.random.Generator, tokenizer, fim_rate: float,
              spm_rate: float, unit: str = 'char') -> tuple[np.ndarray, np.ndarray]:
  """(tokens_R, valid_R) of a window of R tokens with its fragments rearranged as drawn;
  valid_R is False on the padding of a window that came out shorter."""
  length, out, run = len(tokens_R), [], []
  for token in [*np.asarray(tokens_R).tolist(), None]:
    if token is not None and token < tokenizer.first_special:
      run.append(token)
      continue
    if run and rng.random() < fim_rate:
      parts = cut(tokenizer.decode(run), rng, unit)
      run = arrange(tokenizer, *parts, spm=rng.random() < spm_rate)
    out += run + ([] if token is None else [token])
    run = []
  out = out[:length]
  valid = np.arange(length) < len(out)
  return np.asarray(out + [tokenizer.pad_id] * (length - len(out)), np.int32), valid
