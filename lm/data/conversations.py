"""Conversations for instruction tuning: JSONL files of {"messages": [...]}, or the embedded
default set built from the Python standard library itself (no download).

The default set, deterministic on a given Python: for every public top-level function and
public method of a public top-level class with a docstring, of at most MAX_SOURCE characters,
in the stdlib's modules (corpus.stdlib_files), one conversation whose kind a stable hash of
`module.name` picks (a method's name is `Class.method`):

- explain: "What does `module.name` do?" -> the docstring's first paragraph;
- write: "Write a function `name(signature)` that: <first paragraph>" -> the function's source;
- system: the explain question after a system message (SYSTEM);
- follow-up: the explain question and answer, then "Show me its source." -> the source.

A conversation is held out for validation by its module (corpus.is_validation of the module's
file key, as the pretraining corpus splits files), so no module is in both splits.
"""
from __future__ import annotations

import ast
import hashlib
import warnings
from typing import Iterator

from lm.errors import ConfigError
from lm.data import corpus

MAX_SOURCE = 600  # characters of a function's source: the answers fit a short context
SYSTEM = 'You answer questions about the Python standard library, briefly and exactly.'
KINDS = ('explain', 'write', 'system', 'follow-up')


def split_conversations(paths, val_fraction: float) -> Iterator[tuple[str, str, list[dict]]]:
  """('train' or 'val', where it is from, messages) of every conversation of data.paths (JSONL files, each line
  {"messages": [...]}, held out line by line), or of the default set when paths is empty."""
  if not paths:
    for key, messages in stdlib_conversations():
      yield ('val' if corpus.is_validation(key, val_fraction) else 'train'), key, messages
    return
  for source in corpus.glob_files(paths):
    for number, line, messages in read_jsonl(source):
      split = 'val' if corpus.is_validation(line, val_fraction) else 'train'
      yield split, f'{source.path}:{number}: messages', messages


def read_jsonl(source: corpus.SourceFile) -> Iterator[tuple[int, str, list[dict]]]:
  """(line number, the line, messages) of each non-blank line; a line that is not JSON or has no
  "messages" list is an error naming the file and line."""
  with open(source.path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        messages = corpus.json_field(line, 'messages', list)
      except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'{source.path}:{number}: want an object with a "messages" list of '
                          f'{{"role": ..., "content": ...}} ({e!r})') from e
      yield number, line.strip(), messages


def stdlib_conversations() -> Iterator[tuple[str, list[dict]]]:
  """(the module's file key, messages) of the default set, in a fixed order."""
  for source in corpus.stdlib_files():
    module = source.key[:-len('.py')].replace('/', '.').removesuffix('.__init__')
    for name, signature, summary, code in functions(source):
      yield source.key, _conversation(f'{module}.{name}', name, signature, summary, code)


def functions(source: corpus.SourceFile) -> Iterator[tuple[str, str, str, str]]:
  """(name, signature, docstring summary, source) of the file's public top-level functions
  and its public classes' public methods."""
  try:
    text = source.path.read_text(encoding='utf-8')
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', SyntaxWarning)
      tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
  except (SyntaxError, UnicodeDecodeError, ValueError):
    return
  found = [('', node) for node in tree.body if isinstance(node, ast.FunctionDef)]
  found += [(f'{c.name}.', node) for c in tree.body
                if isinstance(c, ast.ClassDef) and not c.name.startswith('_')
                for node in c.body if isinstance(node, ast.FunctionDef)]
  for prefix, node in found:
    if node.name.startswith('_'):
      continue
    doc = ast.get_docstring(node)
    code = ''.join(lines[node.lineno - 1:node.end_lineno]).rstrip()  # a method's indented
    if not doc or len(code) > MAX_SOURCE:
      continue
    summary = ' '.join(doc.split('\n\n')[0].split())
    yield prefix + node.name, f'{prefix}{node.name}({ast.unparse(node.args)})', summary, code


def _conversation(qualified: str, name: str, signature: str, summary: str,
                  code: str) -> list[dict]:
  kind = KINDS[int.from_bytes(hashlib.sha256(qualified.encode()).digest()[:4], 'big')
               % len(KINDS)]
  explain = [{'role': 'user', 'content': f'What does `{qualified}` do?'},
             {'role': 'assistant', 'content': summary}]
  if kind == 'explain':
    return explain
  if kind == 'write':
    return [{'role': 'user', 'content': f'Write a function `{signature}` that: {summary}'},
            {'role': 'assistant', 'content': code}]
  if kind == 'system':
    return [{'role': 'system', 'content': SYSTEM}, *explain]
  return [*explain, {'role': 'user', 'content': 'Show me its source.'},
          {'role': 'assistant', 'content': code}]
