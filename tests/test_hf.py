"""lm.hf against `transformers` in PyTorch: random weights, tiny configs, logits in and out."""
from __future__ import annotations

import dataclasses

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lm import hf, models
from lm.config import ConfigError

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
ROPE = {'rope_type': 'default', 'rope_theta': 500000.0}


def hf_model(arch: str):
  if arch == 'gpt2':
    config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, n_inner=64, activation_function='gelu_new')
    model = transformers.GPT2LMHeadModel(config)
  elif arch == 'llama':  # grouped-query, untied, no biases
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_parameters=ROPE))
  elif arch == 'llama-biases-tied':  # multi-head, tied, biases everywhere
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, rope_parameters=ROPE))
  elif arch == 'mixtral':  # 4 experts, 2 per token
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters=ROPE))
  else:  # multi-query, a window shorter than the sequence
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_key_value_heads=1, sliding_window=5, rope_parameters=ROPE))
  torch.manual_seed(0)
  with torch.no_grad():  # large random weights, so that every tensor moves the logits
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 101, (2, 16))


@pytest.mark.parametrize('arch', ['gpt2', 'llama', 'llama-biases-tied', 'mistral', 'mixtral'])
def test_load_and_save_match_transformers_logits(arch, tmp_path):
  theirs = hf_model(arch)
  theirs.save_pretrained(tmp_path / 'hf')
  cfg, params = hf.load(tmp_path / 'hf')
  expected = hf_logits(theirs, TOKENS)
  logits = models.build(cfg).apply({'params': params}, jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 1.0  # the logits are not trivially small
  if arch == 'mistral':
    assert cfg.window == 5 and cfg.kv_heads == 1 and TOKENS.shape[1] > cfg.window
  hf.save(cfg, params, tmp_path / 'ours')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
  assert type(reloaded).__name__ == type(theirs).__name__
  np.testing.assert_allclose(hf_logits(reloaded, TOKENS), expected, atol=1e-4, rtol=0)


def test_mixtral_auxiliary_loss_and_its_older_checkpoint_layout(tmp_path):
  from safetensors.numpy import load_file
  from lm import objectives
  theirs = hf_model('mixtral')
  with torch.no_grad():
    expected = theirs(torch.tensor(TOKENS), output_router_logits=True).aux_loss.item()
  theirs.save_pretrained(tmp_path / 'hf')
  cfg, params = hf.load(tmp_path / 'hf')
  model = models.build(cfg)
  weighted = models.build(dataclasses.replace(cfg, moe_aux_coef=0.5))  # the loss's weight
  batch = {'inputs': TOKENS, 'targets': TOKENS, 'loss_mask': np.ones(TOKENS.shape, bool)}
  loss, metrics = objectives.clm_loss(params, batch, None, apply_fn=weighted.apply)
  np.testing.assert_allclose(float(metrics['moe_aux']), expected, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(metrics['nll']) + 0.5 * expected, rtol=1e-5)
  # transformers writes each expert's w1 (gate), w3 (up), w2 (down) under block_sparse_moe;
  # lm.hf.save writes the fused gate_up_proj / down_proj that transformers 5 holds in memory.
  assert 'model.layers.0.block_sparse_moe.experts.3.w2.weight' in load_file(
      tmp_path / 'hf' / 'model.safetensors')
  hf.save(cfg, params, tmp_path / 'ours')
  assert 'model.layers.0.mlp.experts.gate_up_proj' in load_file(
      tmp_path / 'ours' / 'model.safetensors')
  _, fused = hf.load(tmp_path / 'ours')
  np.testing.assert_array_equal(model.apply({'params': fused}, TOKENS),
                                model.apply({'params': params}, TOKENS))


def test_a_directory_missing_files_or_unsupported(tmp_path):
  with pytest.raises(ConfigError, match='no config.json'):
    hf.load(tmp_path)
  hf_model('llama').save_pretrained(tmp_path / 'm')
  (tmp_path / 'm' / 'model.safetensors').unlink()
  with pytest.raises(ConfigError, match='no model.safetensors'):
    hf.load(tmp_path / 'm')
  config = json.loads((tmp_path / 'm' / 'config.json').read_text())
  (tmp_path / 'm' / 'config.json').write_text(json.dumps({**config, 'model_type': 'bart'}))
  with pytest.raises(ConfigError, match="model_type='bart' is not supported"):
    hf.load(tmp_path / 'm')


def test_weights_that_do_not_match_their_config(tmp_path):
  hf_model('llama').save_pretrained(tmp_path / 'm')
  path = tmp_path / 'm' / 'config.json'
  config = json.loads(path.read_text())
  path.write_text(json.dumps({**config, 'num_key_value_heads': 4}))
  with pytest.raises(ConfigError, match='does not match its config'):
    hf.load(tmp_path / 'm')
  path.write_text(json.dumps({**config, 'num_hidden_layers': 3}))
  with pytest.raises(ConfigError, match="lack 'model.layers.2"):
    hf.load(tmp_path / 'm')


def test_an_architecture_with_no_hugging_face_equivalent(tmp_path):
  cfg, params = hf.load(_saved(tmp_path))
  odd = dataclasses.replace(cfg, **{'mlp': 'gelu'})
  with pytest.raises(ConfigError, match='no supported Hugging Face architecture'):
    hf.save(odd, params, tmp_path / 'out')


def _saved(tmp_path):
  hf_model('llama').save_pretrained(tmp_path / 'm')
  return tmp_path / 'm'


def test_a_local_global_pattern_has_no_hugging_face_equivalent(tmp_path):
  cfg, params = hf.load(_saved(tmp_path))
  patterned = dataclasses.replace(cfg, **{'window': 4, 'layer_pattern': 'LG'})
  with pytest.raises(ConfigError, match=r"layer_pattern='LG'.*: no supported Hugging Face architecture"):
    hf.save(patterned, params, tmp_path / 'out')


def test_scanned_parameters_save_in_the_plain_layout(tmp_path):
  theirs = hf_model('mistral')
  theirs.save_pretrained(tmp_path / 'hf')
  cfg, params = hf.load(tmp_path / 'hf')
  scanned = dataclasses.replace(cfg, scan_layers=True)
  stacked = models.layout_for(scanned, params)
  np.testing.assert_allclose(models.build(scanned).apply({'params': stacked}, TOKENS),
                             hf_logits(theirs, TOKENS), atol=1e-4, rtol=0)
  hf.save(scanned, stacked, tmp_path / 'ours')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
  np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(theirs, TOKENS), atol=1e-4,
                             rtol=0)
