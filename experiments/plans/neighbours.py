"""configs/decoder.py's default (Muon, wsd, squared ReLU; issue 30) against one change each: the
embedding skip, AdamW's rate for the parameters Muon leaves to it, the weight decay, and the
budget's shape
(width, depth, batch), at the same seconds of training, two paired seeds; the same short
budget as experiments/plans/recipe.py and options.py (150 s of train steps, about a third of
the default's), every schedule decayed to its own last step.

  python experiments/ablate.py --plan=experiments/plans/neighbours.py --out=runs/ablate/neighbours

Arms:
  base        configs/decoder.py as it was (AdamW's rate 5e-3)
  embed_skip  each block's input a x + b x0 (x0 the embeddings), (a, b) learned from (1, 0)
  adam_lo     AdamW (embeddings, norms) at 2.5e-3 instead of 5e-3
  adam_hi     AdamW at 1e-2
  wd_0        no weight decay (the default 0.1, on the matrices and the embeddings)
  wd_hi       weight decay 0.3
  wide        width 192 (6 heads sharing 2 key/value heads, MLP 792): 2.1x the parameters
  deep        6 layers instead of 4: 1.5x the block parameters
  batch_32    32 windows a step instead of 16: half the steps
"""


def get_plan():
  return dict(
      config='configs/decoder.py',
      # the default when this plan ran: AdamW at 5e-3 (1e-2 since, adam_hi), no value
      # residual and a BPE of 2048 ids (since experiments/plans/shape.py)
      overrides={'train.eval_batches': 8, 'train.log_every': 10, 'train.num_samples': 0,
                 'train.learning_rate': 5e-3, 'model.value_residual': False,
                 'tokenizer.vocab_size': 2048},
      arms={
          'base': {},
          'embed_skip': {'model.embed_skip': True},
          'adam_lo': {'train.learning_rate': 2.5e-3},
          'adam_hi': {'train.learning_rate': 1e-2},
          'wd_0': {'train.weight_decay': 0.0},
          'wd_hi': {'train.weight_decay': 0.3},
          'wide': {'model.d_model': 192, 'model.num_heads': 6, 'model.mlp_dim': 792},
          'deep': {'model.num_layers': 6},
          'batch_32': {'train.batch_size': 32},
      },
      baselines={'clm': 'base'},
      metric={'clm': 'bpb'},
      budget={'seconds': 150},
      lr_multipliers=(1,),
      extend_edge=False,
      seeds=(0, 1),
      evals_per_run=4,
      timing_steps=20,  # the arms of one step cost share a timing (ablate.NOT_IN_STEP_COST)
  )
