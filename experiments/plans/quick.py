"""The quick plan: two tiny decoders (Llama-style and GPT-2-style) on bytes, two learning
rates, two seeds; six runs of a few seconds each. The tests run it on a small corpus:

  python experiments/ablate.py --plan=experiments/plans/quick.py --out=runs/ablate/quick
"""

TINY = {'tokenizer.kind': 'bytes', 'model.num_layers': 2, 'model.d_model': 32,
        'model.num_heads': 2, 'model.num_kv_heads': 1, 'model.mlp_dim': 64, 'model.max_len': 64,
        'data.seq_len': 64, 'train.batch_size': 8, 'train.eval_batches': 2, 'train.log_every': 5,
        'train.async_checkpoints': False,
        # the recipe before issue 30 (configs/decoder.py's is Muon, wsd, squared ReLU)
        'train.optimizer': 'adamw', 'train.schedule': 'cosine', 'model.mlp': 'swiglu',
        'train.learning_rate': 5e-3}


def get_plan():
  return dict(
      config='configs/decoder.py',
      overrides=TINY,
      arms={
          'llama': {},
          'gpt2': {'model.positions': 'learned', 'model.norm': 'layernorm', 'model.mlp': 'gelu',
                   'model.mlp_dim': 128, 'model.use_bias': True, 'model.num_kv_heads': 0},
      },
      baselines={'clm': 'llama'},
      metric={'clm': 'bpb'},
      budget={'flops': 4e9},
      lr_multipliers=(1, 2),
      extend_edge=False,
      seeds=(0, 1),
      evals_per_run=2,
      checkpoints_per_run=2,
  )
