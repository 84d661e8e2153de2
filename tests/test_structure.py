"""The seams the code is built on: the layer kinds are a registry that nothing else branches on."""
import ast
from pathlib import Path

from lm.models.layers.kinds import LAYER_KINDS

LM = Path(__file__).resolve().parents[1] / 'lm'


def _letter_comparisons(source: str, name: str) -> list[str]:
  """`x == 'M'`, `kind in 'GL'`, `'L' in pattern`, `s.count('M')`: each comparison of a string
  of layer letters, or a count of one, in `source`, as 'name:line'."""
  found = []
  is_letters = lambda node: (isinstance(node, ast.Constant) and isinstance(node.value, str)
                             and node.value and set(node.value) <= set(LAYER_KINDS))
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare) and any(map(is_letters, [node.left, *node.comparators])):
      found.append(f'{name}:{node.lineno}')
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in ('count', 'replace', 'find', 'index')
        and any(map(is_letters, node.args))):
      found.append(f'{name}:{node.lineno}')
  return found


def test_no_module_but_the_registry_compares_layer_letters():
  found = [hit for path in sorted(LM.rglob('*.py')) if path.name != 'kinds.py'
           for hit in _letter_comparisons(path.read_text(), str(path.relative_to(LM)))]
  assert found == []


def test_the_letter_check_finds_a_comparison():
  source = "def f(kind, pattern):\n  return kind in 'MS' or pattern.count('G')\n"
  assert _letter_comparisons(source, 'probe.py') == ['probe.py:2'] * 2
