"""The encoders at matched training FLOPs, each on its own task and metric: BERT (masked LM
plus next-sentence prediction, configs/encoder.py: bytes, 128 tokens, batch 32) ranked on its
masked-token loss (accuracy beside it in results.csv), and T5 and the original transformer
(span corruption, configs/encdec.py: its BPE of 2048 ids, 256 input tokens, batch 16) on the
span-corruption target loss, the transformer paired with T5. The budget is the FLOPs of 130
steps of T5; each arm's learning rate swept (x0.5, x1, x2 of its config's), three seeds.

  python experiments/ablate.py --plan=experiments/plans/encoders.py --out=runs/ablate/encoders
"""

T5_TRAIN_FLOPS_PER_TOKEN = 7_018_440  # the t5 arm's task.train_flops_per_token()
BUDGET_STEPS = 130

TRANSFORMER = {'model.positions': 'sinusoidal', 'model.scale_embeddings': True,
               'model.post_norm': True, 'model.norm': 'layernorm', 'model.use_bias': True,
               'model.scaled_attention': True, 'model.mlp': 'relu'}


def get_plan():
  return dict(
      config='configs/encdec.py',
      overrides={'train.eval_batches': 8, 'train.log_every': 10, 'train.num_samples': 0},
      arms={
          'bert': {'config': 'configs/encoder.py'},
          't5': {},
          'transformer': TRANSFORMER,
      },
      baselines={'mlm_nsp': 'bert', 'span': 't5'},
      metric={'mlm_nsp': 'mlm_loss', 'span': 'loss'},
      budget={'flops': BUDGET_STEPS * 16 * 256 * T5_TRAIN_FLOPS_PER_TOKEN},
      lr_multipliers=(0.5, 1, 2),
      extend_edge=True,
      seeds=(0, 1, 2),
      evals_per_run=6,
  )
