"""configs/decoder.py's default (issue 30's recipe) against the value residual and the budget's
shape that the neighbours plan left out: the context length (at the same tokens a step) and the
BPE vocabulary size, at the same seconds of training, two paired seeds; the budget of
experiments/plans/neighbours.py (150 s of train steps), every schedule decayed to its own last
step. The held-out bytes are the same for every arm; bits per byte are comparable across
vocabularies and contexts (a shorter context scores its tokens with less before them, which
the default's plain figure would too).

  python experiments/ablate.py --plan=experiments/plans/shape.py --out=runs/ablate/shape

Arms:
  base            configs/decoder.py as it was (no value residual, a BPE of 2048 ids)
  value_residual  attention layers 2-4 attend with a v + b v1 (v1 the first layer's values)
  seq_128         windows of 128 tokens, 32 a step (the same tokens a step)
  seq_512         windows of 512 tokens, 8 a step
  vocab_1024      a BPE of 1024 ids instead of 2048
  vocab_4096      a BPE of 4096 ids
"""


def get_plan():
  return dict(
      config='configs/decoder.py',
      # the default when this plan ran: no value residual, a BPE of 2048 ids (both kept since)
      overrides={'train.eval_batches': 8, 'train.log_every': 10, 'train.num_samples': 0,
                 'model.value_residual': False, 'tokenizer.vocab_size': 2048},
      arms={
          'base': {},
          'value_residual': {'model.value_residual': True},
          'seq_128': {'data.seq_len': 128, 'train.batch_size': 32},
          'seq_512': {'data.seq_len': 512, 'model.max_len': 512, 'train.batch_size': 8},
          'vocab_1024': {'tokenizer.vocab_size': 1024},
          'vocab_4096': {'tokenizer.vocab_size': 4096},
      },
      baselines={'clm': 'base'},
      metric={'clm': 'bpb'},
      budget={'seconds': 150},
      lr_multipliers=(1,),
      extend_edge=False,
      seeds=(0, 1),
      evals_per_run=4,
      timing_steps=40,  # the arms of one step cost share a timing (ablate.NOT_IN_STEP_COST)
      timing_rounds=4,  # timed in turns: this shared host's speed drifts by 10% and more
  )
