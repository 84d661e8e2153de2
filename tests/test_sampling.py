"""The sampler against a step-by-step numpy-driven reference loop."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm import models, sampling
from lm.config import ModelConfig

CFG = ModelConfig(vocab_size=259, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, max_len=12)


def test_greedy_generation_equals_argmax_decoding_for_prompts_of_different_lengths():
  model = models.build(CFG)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))['params']
  prompts = [[256, 5, 6, 7], [256, 9]]
  out = sampling.generate(model.apply, params, prompts, max_len=12, max_new_tokens=5,
                          rng=jax.random.PRNGKey(1), pad_id=258,
                          filter_fn=sampling.temperature(0.0))
  apply = jax.jit(model.apply)
  for prompt, got in zip(prompts, out):
    seq = list(prompt)
    for _ in range(5):
      logits = apply({'params': params}, jnp.asarray([seq]))
      seq.append(int(np.argmax(logits[0, -1])))
    assert got == seq


def test_sampling_is_deterministic_for_a_key_and_stops_at_max_len():
  model = models.build(CFG)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32))['params']
  run = lambda seed: sampling.generate(model.apply, params, [[256, 1, 2]], max_len=12,
                                       max_new_tokens=50, rng=jax.random.PRNGKey(seed),
                                       pad_id=258)
  assert run(0) == run(0) and len(run(0)[0]) == 12
