"""The declarative name maps of lm.hf: a Rule ties parameters of lm to tensors of a Hugging Face
checkpoint, with the layout change each way; `read` and `write` apply a list of them."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
  """Parameters `ours` ('block_0/attn/query/kernel', ...) are the tensors `theirs`:
  to_hf(*ours arrays) -> theirs arrays; from_hf(shapes of ours, *theirs arrays) -> ours."""
  ours: tuple[str, ...]
  theirs: tuple[str, ...]
  to_hf: Callable[..., tuple[np.ndarray, ...]]
  from_hf: Callable[..., tuple[np.ndarray, ...]]
  optional: int = 0  # the last `optional` of theirs may be absent from a checkpoint (None)


def same(ours: str, theirs: str) -> Rule:
  return Rule((ours,), (theirs,), lambda x: (x,), lambda shapes, x: (x.reshape(shapes[0]),))


def flat(ours: str, theirs: str) -> Rule:
  """Ours [a, b, ...] is theirs flattened (a bias of [heads, head_dim])."""
  return Rule((ours,), (theirs,), lambda x: (x.reshape(-1),),
              lambda shapes, x: (x.reshape(shapes[0]),))


def linear(ours: str, theirs: str, num_in: int = 1) -> Rule:
  """A kernel [in..., out...] (num_in input axes) is torch's Linear weight [out, in]."""
  return Rule((ours,), (theirs,),
              lambda x: (x.reshape(math.prod(x.shape[:num_in]), -1).T,),
              lambda shapes, w: (w.T.reshape(shapes[0]),))


def conv1d(ours: str, theirs: str, num_in: int = 1) -> Rule:
  """A kernel [in..., out...] is GPT-2's Conv1D weight [in, out]."""
  return Rule((ours,), (theirs,),
              lambda x: (x.reshape(math.prod(x.shape[:num_in]), -1),),
              lambda shapes, w: (w.reshape(shapes[0]),))


def depthwise_conv(ours: str, theirs: str) -> Rule:
  """A depthwise kernel [K, C] is torch's Conv1d weight [C, 1, K]."""
  return Rule((ours,), (theirs,), lambda x: (x.T[:, None, :],),
              lambda shapes, w: (w[:, 0, :].T.reshape(shapes[0]),))


def swap_last(ours: str, theirs: str) -> Rule:
  """[..., a, b] is theirs [..., b, a] (stacked experts' kernels)."""
  return Rule((ours,), (theirs,), lambda x: (np.swapaxes(x, -1, -2),),
              lambda shapes, w: (np.swapaxes(w, -1, -2).reshape(shapes[0]),))


def concat(ours: Sequence[str], theirs: str, axis: int,
           to_theirs: Callable[[np.ndarray], np.ndarray] = lambda x: x,
           to_ours: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> Rule:
  """Several parameters, each flattened from `axis` on, side by side on `axis` are one tensor:
  to_theirs(joined) is theirs, and to_ours(theirs) is split back into the parameters."""
  def to_hf(*xs):
    flat_xs = [x.reshape(*x.shape[:axis], -1) for x in xs]
    return (to_theirs(np.concatenate(flat_xs, axis=axis)),)

  def from_hf(shapes, w):
    w = to_ours(w)
    sizes = [math.prod(s[axis:]) for s in shapes]
    parts = np.split(w, np.cumsum(sizes)[:-1], axis=axis)
    return tuple(p.reshape(s) for p, s in zip(parts, shapes))
  return Rule(tuple(ours), (theirs,), to_hf, from_hf)


def copies(ours: str, theirs: Sequence[str]) -> Rule:
  """One parameter written as several equal tensors (BERT's MLM bias, which transformers ties
  to the decoder's bias and may leave out); read from the first, the others optional."""
  return Rule((ours,), tuple(theirs), lambda x: (x,) * len(theirs),
              lambda shapes, first, *rest: (first.reshape(shapes[0]),), len(theirs) - 1)


def _at(tree: dict, path: str):
  for key in path.split('/'):
    tree = tree[key]
  return tree


def _put(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('/')
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def write(rules: Sequence[Rule], params: dict) -> dict[str, np.ndarray]:
  """The Hugging Face tensors of params (the plain layout, numpy)."""
  state = {}
  for rule in rules:
    for name, x in zip(rule.theirs, rule.to_hf(*(_at(params, p) for p in rule.ours))):
      state[name] = np.ascontiguousarray(x)
  return state


def read(rules: Sequence[Rule], tensors: dict[str, np.ndarray], shapes: dict[str, tuple],
         directory: Path, ignored: Sequence[str] = ()) -> dict:
  """The params of `shapes` ('path' -> shape, every parameter of the model) from `tensors`.
  A tensor that a rule needs and is missing, one of the wrong size, a parameter no rule gives,
  and a tensor no rule reads (other than those matching an `ignored` pattern, such as a
  causal-mask buffer) are each a ConfigError naming them."""
  params, used = {}, set()
  for rule in rules:
    required = rule.theirs[:len(rule.theirs) - rule.optional]
    missing = [n for n in required if n not in tensors]
    if missing:
      raise ConfigError(f'{directory}: the weights lack {missing[0]!r}, which its config.json '
                        'implies; the checkpoint does not match its config')
    want = [shapes[p] for p in rule.ours]
    given = [tensors.get(n) for n in rule.theirs]
    try:
      values = rule.from_hf(want, *given)
    except ValueError:
      values = None
    if values is None or any(tuple(v.shape) != tuple(s) for v, s in zip(values, want)):
      raise ConfigError(f'{directory}: {", ".join(rule.theirs)} has shape '
                        f'{[None if g is None else tuple(g.shape) for g in given]}, but config.json implies '
                        f'{[tuple(s) for s in want]} for {", ".join(rule.ours)}; the checkpoint '
                        'does not match its config')
    for path, value in zip(rule.ours, values):
      _put(params, path, value)
    used.update(n for n in rule.theirs if n in tensors)
  given_paths = {p for rule in rules for p in rule.ours}
  lacking = sorted(set(shapes) - given_paths)
  if lacking:
    raise ConfigError(f'{directory}: no tensor gives the parameters {lacking[:5]}; lm cannot '
                      'read this checkpoint')
  unused = sorted(n for n in set(tensors) - used
                  if not any(re.search(pattern, n) for pattern in ignored))
  if unused:
    more = f' and {len(unused) - 8} more' if len(unused) > 8 else ''
    raise ConfigError(f'{directory}: the checkpoint holds tensors that lm does not read: '
                      f'{unused[:8]}{more}; its config.json does not describe them (a different '
                      'architecture or options?), so lm refuses to drop them silently')
  return params
