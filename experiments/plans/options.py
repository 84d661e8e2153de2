"""The decoder's recipe options (issue 30), each alone on top of the recipe plan's winner
(configs/decoder.py as it was, with Muon and the wsd schedule), at the same seconds of training, two paired
seeds; the same short budget as experiments/plans/recipe.py.

  python experiments/ablate.py --plan=experiments/plans/options.py --out=runs/ablate/options

Arms:
  base       SwiGLU 352 with Muon (0.02, momentum warmup 50) and wsd (last 40% decayed)
  relu2      squared-ReLU MLP of 528 (the SwiGLU MLP's parameters and FLOPs)
  qk_norm    RMS-normalised queries and keys
  zero_out   output projections initialised to zero
  softcap    logits 15 tanh(logits / 15)
  untied     an output head apart from the embedding
  decay_0    wsd decayed to 0 instead of 0.1 of the peak
  muon_0.01  Muon at 0.01 (the recipe plan tried 0.02 and 0.04)
"""
# configs/decoder.py's recipe before issue 30 (AdamW, cosine, SwiGLU 352), which this plan's
# figures were measured with
BEFORE_30 = {'train.optimizer': 'adamw', 'train.schedule': 'cosine', 'train.decay_fraction': 0.2,
             'train.muon_momentum_warmup': 0, 'model.mlp': 'swiglu', 'model.mlp_dim': 352,
             'train.learning_rate': 5e-3, 'tokenizer.vocab_size': 2048,
             'model.value_residual': False}
MUON = {'train.schedule': 'wsd', 'train.decay_fraction': 0.4, 'train.optimizer': 'muon',
        'train.muon_learning_rate': 0.02, 'train.muon_momentum_warmup': 50}  # recipe.py's muon


def get_plan():
  return dict(
      config='configs/decoder.py',
      overrides={**BEFORE_30, 'train.eval_batches': 8, 'train.log_every': 10,
                 'train.num_samples': 0, **MUON},
      arms={
          'base': {},
          'relu2': {'model.mlp': 'relu2', 'model.mlp_dim': 528},
          'qk_norm': {'model.qk_norm': True},
          'zero_out': {'model.zero_init_out': True},
          'softcap': {'model.logit_softcap': 15.0},
          'untied': {'model.tie_embeddings': False},
          'decay_0': {'train.min_lr_ratio': 0.0},
          'muon_0.01': {'train.muon_learning_rate': 0.01},
      },
      baselines={'clm': 'base'},
      metric={'clm': 'bpb'},
      budget={'seconds': 150},
      lr_multipliers=(1,),
      extend_edge=False,
      seeds=(0, 1),
      evals_per_run=4,
  )
