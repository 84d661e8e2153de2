"""The config boundary: every user mistake gets an error naming field, value and fix."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lm import config as config_lib
from lm.config import ConfigError
from tests.conftest import ROOT, load_config


def parse(c, device_count=1):
  return config_lib.parse(c, vocab_size=259, device_count=device_count)


def test_default_config_parses_into_frozen_typed_config():
  cfg = parse(load_config())
  assert cfg.model.vocab_size == 259 and cfg.model.head_dim == cfg.model.d_model // 4
  assert cfg.data.paths == () and cfg.mesh.shape == (-1, 1, 1)
  with pytest.raises(AttributeError):
    cfg.model.d_model = 3  # frozen


def test_paths_from_command_line_string_become_a_tuple():
  c = load_config()
  c.data.paths = 'a/*.txt,b/*.jsonl'
  assert parse(c).data.paths == ('a/*.txt', 'b/*.jsonl')


def test_d_model_not_divisible_by_num_heads():
  c = load_config()
  c.model.d_model = 250
  with pytest.raises(ConfigError, match=r'model\.d_model=250: must be divisible by '
                                        r'model\.num_heads=4; try model\.d_model=248'):
    parse(c)


def test_seq_len_larger_than_max_len():
  c = load_config()
  c.model.max_len = 256
  c.data.seq_len = 512
  with pytest.raises(ConfigError, match=r'data\.seq_len=512: exceeds model\.max_len=256'):
    parse(c)


@pytest.mark.parametrize('overrides, message', [
    (dict(num_heads=4, num_kv_heads=3), r'model\.num_kv_heads=3: must divide model\.num_heads=4'),
    (dict(window=0), r'model\.window=0: a query sees its last `window` positions, itself '
                     r'included: give >= 1, or leave it unset \(None\)'),
    (dict(window=-3), r'model\.window=-3: a query sees'),
    (dict(window=4, layer_pattern='LLXG'), r"model\.layer_pattern='LLXG': use one letter a layer: G global"),
    (dict(layer_pattern='LG'), r"model\.layer_pattern='LG': local \(L\) layers need model\.window"),
    (dict(remat='some'), r"model\.remat='some': use one of \('none', 'full', 'dots'\)"),
    (dict(num_layers=4, window=8, layer_pattern='LLG', scan_layers=True),
     r"model\.num_layers=4: scan_layers repeats model\.layer_pattern='LLG': num_layers must be "
     r'a multiple of its length 3'),
    (dict(positions='rope', d_model=12, num_heads=4),
     r'model\.d_model=12: RoPE rotates pairs: head width d_model / num_heads = 3 must be even'),
    (dict(norm='batchnorm'), r"model\.norm='batchnorm': use one of \('layernorm', 'rmsnorm'\)"),
    (dict(mlp='tanh'), r"model\.mlp='tanh': use one of"),
    (dict(mlp='swiglu', num_experts=4, experts_per_token=5),
     r'model\.experts_per_token=5: must be in \[1, model\.num_experts=4\]'),
    (dict(mlp='gelu', num_experts=4), r"model\.mlp='gelu': experts are SwiGLU MLPs"),
    (dict(mlp='swiglu', num_experts=4, moe_capacity_factor=-1.0),
     r'model\.moe_capacity_factor=-1\.0: give a factor above 0'),
])
def test_bad_architecture_options(overrides, message):
  c = load_config()
  c.model.update(overrides)
  with pytest.raises(ConfigError, match=message):
    parse(c)


@pytest.mark.parametrize('shape', [(3, 1, 1), (2, 2, 1), (-1, -1, 1), (3, -1, 1), (8, 1)])
def test_mesh_shape_whose_product_is_not_the_device_count(shape):
  c = load_config()
  c.mesh.shape = shape
  with pytest.raises(ConfigError, match=r'mesh\.shape=.*device count 8'):
    parse(c, device_count=8)


def test_mesh_shape_fills_one_minus_one():
  assert config_lib.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert config_lib.mesh_shape((2, -1, 1), 8) == (2, 4, 1)


def test_batch_not_divisible_by_data_parallel_size():
  c = load_config()
  c.mesh.shape = (3, 1, 1)
  c.train.batch_size = 16
  with pytest.raises(ConfigError, match=r'train\.batch_size=16: must be divisible'):
    parse(c, device_count=3)


def test_unknown_key_and_wrong_type():
  c = load_config().to_dict()
  c['model']['num_layer'] = 2
  with pytest.raises(ConfigError, match=r'model\.num_layer=2: unknown key'):
    parse(c)
  c = load_config().to_dict()
  c['train']['steps'] = 'many'
  with pytest.raises(ConfigError, match=r"train\.steps='many': give an integer"):
    parse(c)


def test_vocab_size_is_not_the_users_to_set():
  c = load_config().to_dict()
  c['model']['vocab_size'] = 100
  with pytest.raises(ConfigError, match=r'model\.vocab_size=100: unknown key'):
    parse(c)


def test_cli_prints_user_error_without_traceback_and_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'lm.main', '--config=configs/decoder.py',
       f'--workdir={tmp_path / "run"}', '--config.model.d_model=250'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert 'error: model.d_model=250: must be divisible' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run' / 'config.json').exists()


def test_config_file_that_does_not_exist(tmp_path):
  with pytest.raises(ConfigError, match=r"--config='.*nope\.py': no such file"):
    config_lib.from_file(tmp_path / 'nope.py')


@pytest.mark.parametrize('args, message', [
    (['--config=configs/decoder.py', '--config.model.nope=3'],
     "--config.model.nope=3: model has no key 'nope'; it has ['d_model'"),
    (['--config=configs/decoder.py', '--config.train.steps=abc'],
     'flag --config.train.steps=abc: invalid literal for int()'),
    (['--config=configs/nope.py'],
     "--config='configs/nope.py': cannot load it ([Errno 2] No such file"),
])
def test_cli_flag_mistakes_are_one_line_errors(args, message, tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'lm.main', f'--workdir={tmp_path / "run"}', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith('error: ' + message), proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('name, vocab, params', [
    ('gpt2', 50257, 124_439_808),  # GPT-2 small, as published
    # Llama: embed + head 2*32768*512, per layer q/out 2*512^2 + k/v 2*512*128 + 3*512*1536
    # + 2 norms of 512, final norm 512.
    ('llama', 32768, 2 * 32768 * 512 + 8 * (2 * 512**2 + 2 * 512 * 128 + 3 * 512 * 1536
                                            + 2 * 512) + 512),
    # moe: the llama preset with 8 experts of 3*512*1536 and a 512x8 router per layer
    ('moe', 32768, 2 * 32768 * 512 + 8 * (2 * 512**2 + 2 * 512 * 128 + 8 * 3 * 512 * 1536
                                          + 512 * 8 + 2 * 512) + 512),
])
def test_presets_parse_and_have_their_published_sizes(name, vocab, params):
  import jax
  import flax.linen as nn
  from lm import models, tokenizers
  c = load_config(name)
  cfg = config_lib.parse(c, device_count=1,
                         vocab_size=lambda t: tokenizers.vocab_size_of(t.kind, t.vocab_size))
  assert cfg.model.vocab_size == vocab
  shapes = jax.eval_shape(lambda: models.build(cfg.model).init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, 8), 'int32')))
  assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes))) == params


def test_skip_nonfinite_steps_must_not_be_negative():
  c = load_config()
  c.train.skip_nonfinite_steps = -1
  with pytest.raises(ConfigError, match=r'train\.skip_nonfinite_steps=-1: how many non-finite '
                                        r'steps to skip before stopping: give 0'):
    parse(c)
  c.train.skip_nonfinite_steps = 3
  assert parse(c).train.skip_nonfinite_steps == 3


def test_a_run_saved_before_layer_pattern_and_the_scan_keys_still_resumes(tmp_path):
  """config.json of a run from before model.window_pattern became model.layer_pattern and the
  scan layer's keys existed: the same config resumes it, and its model loads."""
  import json
  from lm import checkpoint
  from lm.config import model_from_dict, upgrade_saved
  c = load_config()
  c.model.update(window=8, layer_pattern='LG')
  cfg = config_lib.parse(c, vocab_size=259, device_count=1)
  old = json.loads(cfg.to_json())
  old['model']['window_pattern'] = old['model'].pop('layer_pattern')
  for key in ('state_size', 'd_conv', 'expand', 'dt_rank', 'dt_min', 'dt_max', 'conv_bias',
              'scan', 'scan_chunk'):
    del old['model'][key]
  old['model'].update(post_norm=False, num_segments=0)  # every family's keys were saved then
  (tmp_path / 'config.json').write_text(json.dumps(old))
  checkpoint.prepare_workdir(tmp_path, cfg)  # no error: the same run
  assert model_from_dict(upgrade_saved(old)['model']) == cfg.model
  c.model.layer_pattern = 'GL'
  with pytest.raises(ConfigError, match=r"model.layer_pattern: 'LG' in the workdir, 'GL' now"):
    checkpoint.prepare_workdir(tmp_path, config_lib.parse(c, vocab_size=259, device_count=1))
