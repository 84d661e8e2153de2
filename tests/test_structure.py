"""The seams the code is built on: layer kinds, tasks and families are registries nothing else
branches on; lm/ has no import cycle (inside functions too); the decoding interfaces and
per-layer states satisfy their protocols; a data key of another task names its owner."""
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


def _executed(tree: ast.AST):
  """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for annotations only,
  never run)."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test):
      yield from (n for child in node.orelse for n in ast.walk(child))
      continue
    yield node
    yield from _executed(node)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
  """The lm modules that `module` (at `path`) imports anywhere in it, inside functions too:
  `import lm.a.b`, `from lm.a import b` (b a module, else lm.a), relative imports."""
  out = set()
  package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
  for node in _executed(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {alias.name for alias in node.names if alias.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      if not base.startswith('lm'):
        continue
      for alias in node.names:
        child = f'{base}.{alias.name}'
        out.add(child if child in modules else base)
  return out - {module}


def import_graph() -> dict[str, set[str]]:
  paths = {}
  for path in LM.rglob('*.py'):
    parts = path.relative_to(LM.parent).with_suffix('').parts
    paths['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return {m: _imports(p, m, set(paths)) & set(paths) for m, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each module that lies on one (depth-first search), as a list."""
  found, done = [], set()

  def visit(node, stack):
    if node in stack:
      found.append(stack[stack.index(node):] + [node])
      return
    if node in done:
      return
    for nxt in sorted(graph.get(node, ())):
      visit(nxt, stack + [node])
    done.add(node)
  for node in sorted(graph):
    visit(node, [])
  return found


def test_lm_has_no_import_cycle_even_inside_functions():
  assert cycles(import_graph()) == []


def test_the_cycle_check_finds_one():
  graph = {'lm.a': {'lm.b'}, 'lm.b': {'lm.c'}, 'lm.c': {'lm.a'}, 'lm.d': {'lm.a'}}
  assert cycles(graph) == [['lm.a', 'lm.b', 'lm.c', 'lm.a']]


def _members(protocol: type) -> dict[str, list[str]]:
  """A Protocol's methods and properties -> their parameter names (a property: [])."""
  import inspect
  out = {}
  for name, member in vars(protocol).items():
    if isinstance(member, property):
      out[name] = []
    elif inspect.isfunction(member) and not name.startswith('_'):
      out[name] = list(inspect.signature(member).parameters)
  return out


def test_the_decoding_states_and_interfaces_satisfy_their_protocols():
  import inspect
  from lm import models
  from lm.models import decoder, encdec
  from lm.models.layers import kinds, kv_cache, ssm
  pairs = [(models.Decoding, [decoder.Decoding, encdec.Decoding]),
           (kinds.LayerState, [kv_cache.KVCache, ssm.ScanState, encdec.DecoderLayerState])]
  for protocol, classes in pairs:
    members = _members(protocol)
    assert members
    for cls in classes:
      for name, params in members.items():
        member = inspect.getattr_static(cls, name, None)
        assert member is not None, (cls, name)
        if params:
          assert list(inspect.signature(member).parameters) == params, (cls, name)
        else:
          assert isinstance(member, property), (cls, name)


def test_every_registered_mixer_takes_the_mixer_keywords():
  """Every layer kind's mixer takes (h, state) and the Mixer keywords, so the decoder calls
  all alike."""
  import inspect
  from lm.models import DecoderConfig
  from lm.models.layers import kinds
  wanted = [n for n, p in inspect.signature(kinds.Mixer.__call__).parameters.items()
            if p.kind is p.KEYWORD_ONLY]
  cfg = DecoderConfig(vocab_size=11, window=4)
  for letter, kind in kinds.LAYER_KINDS.items():
    params = inspect.signature(type(kind.mixer(cfg, 0.02)).__call__).parameters
    keyword = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    assert len(params) - len(keyword) == 3 and set(wanted) <= set(keyword), (letter, params)


def test_config_branches_on_no_task_or_family_name_and_imports_only_the_registries():
  from lm import models, tasks
  tree = ast.parse((LM / 'config.py').read_text())
  names = set(tasks.TASKS) | set(models.FAMILIES)
  compared = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
              and any(isinstance(n, ast.Constant) and n.value in names
                      for n in [node.left, *node.comparators])]
  assert compared == []
  imported = import_graph()['lm.config']
  assert not {m for m in imported if m.startswith(('lm.tasks.', 'lm.models.', 'lm.data'))}
  assert {'lm.tasks', 'lm.models'} <= imported


def test_a_data_key_of_another_task_is_one_line_naming_its_owner():
  from lm import config as config_lib
  from lm.errors import ConfigError
  from tests.conftest import load_config
  for name, key, value, owner, task in (('decoder', 'mask_rate', 0.2, 'mlm_nsp', 'clm'),
                                        ('encdec', 'fim_rate', 0.5, 'clm', 'span'),
                                        ('encoder', 'target_len', 8, 'seq2seq', 'mlm_nsp')):
    c = load_config(name)
    c.data[key] = value
    try:
      config_lib.parse(c, vocab_size=400, device_count=1)
      raise AssertionError(f'{name}: data.{key} was taken')
    except ConfigError as e:
      assert str(e) == (f'data.{key}={value!r}: a key of the {owner} task, and '
                        f"data.task={task!r}; remove it from the config (a config lists only "
                        "its task's keys)")
