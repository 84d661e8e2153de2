"""The causal families at matched training FLOPs, on the default's data (the stdlib sources,
its BPE of 2048 ids, windows of 256 tokens, batches of 16): every arm is configs/decoder.py's
size (width 128, about 1M parameters) with one change of family or layer kind, its learning
rate swept (x0.5, x1, x2 of 5e-3, one more past an edge best), then three seeds at the best.
The budget is the FLOPs of 130 steps of the Llama-style default (about 0.53M tokens): short runs,
so that the 7 arms x 5-6 runs fit in an hour on 2 CPU cores.

  python experiments/ablate.py --plan=experiments/plans/families.py --out=runs/ablate/families

Arms (layer kinds: G global attention, L sliding window, M Mamba-1, S S4D):
  llama    the default before issue 30 (AdamW, cosine): RoPE, RMSNorm, SwiGLU 352, 4 heads
           sharing 2 key/value heads (G)
  gpt2     learned positions, LayerNorm, GELU MLP 512, biases, 4 key/value heads
  swa      llama with a sliding window of 64 tokens in every layer (L), Mistral-style
  moe      llama with 8 SwiGLU experts of 176, 2 a token (Mixtral-style; the dense MLP's FLOPs)
  mamba    6 Mamba-1 layers (inner width 256, 8 states), no MLP, no positions (M)
  s4d      llama's blocks with an S4D layer of 8 states for attention, no positions (S)
  hybrid   Jamba-style: three Mamba-1 layers to one attention layer (MMMG), MLPs kept
"""

LLAMA_FLOPS_PER_TOKEN = 7_569_408  # lm.models.train_flops_per_token of the llama arm at T 256
BUDGET_STEPS = 130
TOKENS_PER_STEP = 16 * 256

# configs/decoder.py's recipe before issue 30 (AdamW, cosine, SwiGLU 352), which this plan's
# figures were measured with
BEFORE_30 = {'train.optimizer': 'adamw', 'train.schedule': 'cosine', 'train.decay_fraction': 0.2,
             'train.muon_momentum_warmup': 0, 'model.mlp': 'swiglu', 'model.mlp_dim': 352,
             'train.learning_rate': 5e-3, 'tokenizer.vocab_size': 2048,
             'model.value_residual': False}

SCAN = {'model.positions': 'none', 'model.state_size': 8, 'model.scan': 'sequential'}


def get_plan():
  return dict(
      config='configs/decoder.py',
      overrides={**BEFORE_30, 'train.eval_batches': 8, 'train.log_every': 10},
      arms={
          'llama': {},
          'gpt2': {'model.positions': 'learned', 'model.norm': 'layernorm', 'model.mlp': 'gelu',
                   'model.mlp_dim': 512, 'model.use_bias': True, 'model.num_kv_heads': 0},
          'swa': {'model.window': 64},
          'moe': {'model.num_experts': 8, 'model.experts_per_token': 2, 'model.mlp_dim': 176},
          'mamba': {**SCAN, 'model.layer_pattern': 'M', 'model.num_layers': 6,
                    'model.mlp_dim': 0},
          's4d': {**SCAN, 'model.layer_pattern': 'S'},
          'hybrid': {**SCAN, 'model.positions': 'rope', 'model.layer_pattern': 'MMMG'},
      },
      baselines={'clm': 'llama'},
      metric={'clm': 'bpb'},
      budget={'flops': BUDGET_STEPS * TOKENS_PER_STEP * LLAMA_FLOPS_PER_TOKEN},
      lr_multipliers=(0.5, 1, 2),
      extend_edge=True,
      seeds=(0, 1, 2),
      evals_per_run=6,
  )
