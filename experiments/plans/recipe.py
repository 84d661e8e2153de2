"""The default run's recipe (issue 30): the optimizer and the schedule, each arm configs/decoder.py
as it was before this plan with one change, at the same seconds of training on this machine, two
paired seeds. Short runs (150 s of train steps, about a third of the default's) so that the plan
fits in half an hour on 2 CPU cores; every run's schedule decays to its own last step.

  python experiments/ablate.py --plan=experiments/plans/recipe.py --out=runs/ablate/recipe

Arms:
  cosine     the default before this plan: AdamW at 5e-3, cosine decay to 0.1 of the peak,
             SwiGLU MLPs of 352
  wsd        warmup-stable-decay: flat, then linear to 0.1 of the peak over the last 40%
  muon       wsd with Muon (lr 0.02, momentum 0.85 -> 0.95 over 50 steps) for the hidden
             matrices, AdamW at 5e-3 for embeddings and norms
  muon_hi    muon at 0.04
"""

# configs/decoder.py's recipe before issue 30 (AdamW, cosine, SwiGLU 352), which this plan's
# figures were measured with
BEFORE_30 = {'train.optimizer': 'adamw', 'train.schedule': 'cosine', 'train.decay_fraction': 0.2,
             'train.muon_momentum_warmup': 0, 'model.mlp': 'swiglu', 'model.mlp_dim': 352,
             'train.learning_rate': 5e-3, 'tokenizer.vocab_size': 2048,
             'model.value_residual': False}
WSD = {'train.schedule': 'wsd', 'train.decay_fraction': 0.4}
MUON = {**WSD, 'train.optimizer': 'muon', 'train.muon_learning_rate': 0.02,
        'train.muon_momentum_warmup': 50}


def get_plan():
  return dict(
      config='configs/decoder.py',
      overrides={**BEFORE_30, 'train.eval_batches': 8, 'train.log_every': 10,
                 'train.num_samples': 0},
      arms={
          'cosine': {},
          'wsd': WSD,
          'muon': MUON,
          'muon_hi': {**MUON, 'train.muon_learning_rate': 0.04},
      },
      baselines={'clm': 'cosine'},
      metric={'clm': 'bpb'},
      budget={'seconds': 150},
      lr_multipliers=(1,),
      extend_edge=False,
      seeds=(0, 1),
      evals_per_run=4,
  )
