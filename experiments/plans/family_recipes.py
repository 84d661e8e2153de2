"""The CPU-sized scan families (configs/mamba.py, configs/hybrid.py) with the recipe they were
sized with (AdamW at 5e-3, cosine) against issue 30's recipe of configs/decoder.py (Muon for
the hidden matrices with its momentum warmed up, AdamW at 1e-2 for the rest, warmup-stable-decay
with a cooldown of 40%), Muon's rate swept over 0.01, 0.02, 0.04 for Mamba; at the same seconds
of training (120 s of train steps, about a fifth of each config's run), two paired seeds,
every schedule decayed to its own last step.

  python experiments/ablate.py --plan=experiments/plans/family_recipes.py --out=runs/ablate/family_recipes

Arms:
  mamba            configs/mamba.py as it was (6 Mamba-1 layers, bytes, AdamW 5e-3, cosine)
  mamba_muon       the same model with issue 30's recipe, Muon at 0.02
  mamba_muon_lo    Muon at 0.01
  mamba_muon_hi    Muon at 0.04
  hybrid           configs/hybrid.py as it was (MMMG, SwiGLU 352, AdamW 5e-3, cosine)
  hybrid_muon      the same model with issue 30's recipe and its squared-ReLU MLP of 528
"""

# the recipe the two configs had when this plan ran (issue 30's since)
BEFORE = {'train.optimizer': 'adamw', 'train.learning_rate': 5e-3, 'train.schedule': 'cosine'}
RECIPE_30 = {'train.optimizer': 'muon', 'train.learning_rate': 1e-2, 'train.schedule': 'wsd',
             'train.decay_fraction': 0.4, 'train.muon_learning_rate': 0.02,
             'train.muon_momentum_warmup': 50}


def get_plan():
  return dict(
      config='configs/mamba.py',
      overrides={'train.eval_batches': 8, 'train.log_every': 10, 'train.num_samples': 0},
      arms={
          'mamba': BEFORE,
          'mamba_muon': RECIPE_30,
          'mamba_muon_lo': {**RECIPE_30, 'train.muon_learning_rate': 0.01},
          'mamba_muon_hi': {**RECIPE_30, 'train.muon_learning_rate': 0.04},
          'hybrid': {'config': 'configs/hybrid.py', **BEFORE, 'model.mlp': 'swiglu',
                     'model.mlp_dim': 352},
          'hybrid_muon': {'config': 'configs/hybrid.py', **RECIPE_30, 'model.mlp': 'relu2',
                          'model.mlp_dim': 528},
      },
      baselines={'clm': 'mamba'},
      metric={'clm': 'bpb'},
      budget={'seconds': 120},
      lr_multipliers=(1,),
      extend_edge=False,
      seeds=(0, 1),
      evals_per_run=4,
      timing_steps=40,
      timing_rounds=4,  # timed in turns: this shared host's speed drifts by 10% and more
  )
