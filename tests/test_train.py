"""The training job end to end: learning, outputs, checkpoints, resume, signals, workdirs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm import checkpoint, load, tokenizers, train
from lm.config import ConfigError
from tests.conftest import ROOT, TEST_XLA_FLAGS


def losses(workdir: Path) -> dict[int, float]:
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {l['step']: l['train/loss'] for l in lines if 'train/loss' in l}


def restore_params(workdir: Path, step: int):
  with ocp.CheckpointManager((workdir / 'checkpoints').absolute()) as manager:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']['params']


def test_tiny_model_overfits_a_tiny_corpus_and_writes_its_outputs(config, tmp_path, capsys):
  config.train.update(steps=150, learning_rate=1e-2, warmup_steps=10, eval_every=50,
                      checkpoint_every=50, log_every=10, num_samples=1, sample_len=20)
  result = train.run(config, tmp_path / 'run')
  first, last = losses(tmp_path / 'run')[10], losses(tmp_path / 'run')[150]
  assert first > 2.0 and last < 0.6, (first, last)
  assert result['val/bpb'] < result['val/gzip_bpb']
  out = capsys.readouterr().out
  assert 'final validation at step 150' in out and 'gzip -9' in out and '--- sample 1 ---' in out
  run = tmp_path / 'run'
  assert json.loads((run / 'config.json').read_text())['model']['d_model'] == 32
  assert json.loads((run / 'tokenizer' / 'tokenizer.json').read_text())['kind'] == 'bytes'
  assert list(run.glob('events.out.tfevents.*'))
  assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir()) == [50, 100, 150]
  records = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  keys = set().union(*records)
  assert {'step', 'train/loss', 'val/loss', 'val/bpb', 'perf/tokens_per_sec', 'perf/mfu'} <= keys


def cli(config, workdir: Path, **overrides) -> list[str]:
  flat = {f'{section}.{k}': v for section in ('model', 'data', 'tokenizer', 'train')
          for k, v in config[section].items() if v is not None}
  flat.update(overrides)
  return [sys.executable, '-m', 'lm.main', '--config=configs/decoder.py', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in flat.items()]]


def start_and_wait_for_checkpoint(cmd: list[str], workdir: Path, step: int) -> subprocess.Popen:
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 120
  while not (workdir / 'checkpoints' / str(step) / 'commit_success.txt').exists():
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, 'no checkpoint within 120s'
    time.sleep(0.01)
  return proc


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(config, tmp_path, capsys):
  # A constant learning rate makes the schedule independent of train.steps, so the killed
  # run may be started with many more steps than the reference.
  config.train.update(steps=30, warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=10)
  reference = tmp_path / 'reference'
  train.run(config, reference)

  killed = tmp_path / 'killed'
  proc = start_and_wait_for_checkpoint(cli(config, killed, **{'train.steps': 100000}), killed, 10)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  capsys.readouterr()
  train.run(config, killed)  # the same config: resumes
  resumed_from = int(capsys.readouterr().out.split('from step ')[1].split()[0])
  assert 10 <= resumed_from < 30
  assert losses(killed) == losses(reference)  # also: lines past the checkpoint were dropped
  expected, got = restore_params(reference, 30), restore_params(killed, 30)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_sigterm_saves_a_checkpoint_and_exits(config, tmp_path):
  workdir = tmp_path / 'run'
  proc = start_and_wait_for_checkpoint(
      cli(config, workdir, **{'train.steps': 100000, 'train.checkpoint_every': 5}), workdir, 5)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, out
  saved = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split()[0])
  assert (workdir / 'checkpoints' / str(saved) / 'commit_success.txt').exists()


def test_workdir_of_an_incompatible_run_is_refused_and_kept(trained):
  config, workdir = trained  # a run of 4 steps, checkpoints at 2 and 4
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  config.model.d_model = 64
  with pytest.raises(ConfigError, match=r"holds a run with another config \(model\.d_model: "
                                        r"32 in the workdir, 64 now\)"):
    train.run(config, workdir)
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before


def test_longer_run_in_the_same_workdir_resumes(trained, capsys):
  config, workdir = trained  # a run of 4 steps, checkpoints at 2 and 4
  config.train.steps = 6
  result = train.run(config, workdir)
  assert 'resuming' in capsys.readouterr().out and result['step'] == 6


def test_a_run_of_a_tokenizer_before_the_sentinels_resumes_with_its_vocabulary(config, tmp_path):
  from lm.tokenizers.tokenizer import byte_tokenizer
  byte_tokenizer(format=1).save(tmp_path / 'run' / 'tokenizer')  # as a run saved before them
  config.train.update(steps=4, eval_every=100, checkpoint_every=2)
  train.run(config, tmp_path / 'run')
  config.train.steps = 6
  assert train.run(config, tmp_path / 'run')['step'] == 6
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['model']['vocab_size'] == 269
  assert tokenizers.load(tmp_path / 'run' / 'tokenizer').format == 1


def test_unwritable_workdir(config, tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ConfigError, match=r"--workdir='.*file/run': not writable"):
    train.run(config, tmp_path / 'file' / 'run')


@pytest.mark.slow
def test_train_step_on_8_devices_gives_the_loss_of_1_device(corpus, tmp_path):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}',
         'JAX_PLATFORMS': 'cpu', 'XDG_CACHE_HOME': str(tmp_path / 'cache')}
  proc = subprocess.run([sys.executable, str(ROOT / 'tests' / 'sharded_check.py'),
                         str(tmp_path / 'run'), str(corpus)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['devices'] == 8 and result['param_shards'] > 1
  np.testing.assert_allclose(result['losses_8'], result['losses_1'], rtol=1e-5)
  assert result['max_param_diff'] < 1e-5
  # the encoder, hybrid and encoder-decoder checks this test made: test_parallel.py, on more
  # meshes and with the same tolerances
  assert result['uneven_error'].startswith(
      "mesh.shape=(2, 2, 2): .params['embed']['embedding'] of shape (369, 32) has a dimension "
      "of 369 split 2 ways over ('tensor',)")
  assert not (tmp_path / 'run' / 'config.json').exists()


@pytest.mark.cpu_only
@pytest.mark.parametrize('user_flags,expected', [
    ('--xla_force_host_platform_device_count=2',
     '--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type='),
    ('--xla_cpu_experimental_ynn_fusion_type=dot', '--xla_cpu_experimental_ynn_fusion_type=dot'),
])
def test_importing_lm_picks_eigen_cpu_matmuls_unless_the_user_chose(user_flags, expected):
  code = 'import os, lm, jax; jax.devices(); print(os.environ["XLA_FLAGS"])'
  out = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'XLA_FLAGS': user_flags},
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.strip() == expected


def test_a_run_trains_its_bpe_once_and_keeps_it_in_the_workdir(config, tmp_path, capsys):
  from lm import tokenizers
  config.tokenizer.update(kind='bpe', vocab_size=390)
  config.train.update(steps=4, eval_every=4, checkpoint_every=4)
  first = train.run(config, tmp_path / 'a')
  assert 'training a byte-level BPE of 390 ids' in capsys.readouterr().out
  tokenizer = tokenizers.load(tmp_path / 'a' / 'tokenizer')
  assert tokenizer.kind == 'bpe' and tokenizer.vocab_size == 390
  assert np.isfinite(first['val/bpb'])
  train.run(config, tmp_path / 'b')  # the same corpus and size: the cached tokenizer
  assert 'training a byte-level BPE' not in capsys.readouterr().out
  assert tokenizers.load(tmp_path / 'b' / 'tokenizer').fingerprint() == tokenizer.fingerprint()
  for cached in Path(config.data.cache_dir).glob('bpe-*'):
    shutil.rmtree(cached)
  config.train.update(steps=6)
  train.run(config, tmp_path / 'a')  # resumes with the tokenizer in its workdir
  assert 'training a byte-level BPE' not in capsys.readouterr().out


def test_bad_tokenizer_config_fails_before_anything_is_written(config, tmp_path):
  config.tokenizer.update(kind='bpe', vocab_size=200)
  with pytest.raises(ConfigError, match='tokenizer.vocab_size=200'):
    train.run(config, tmp_path / 'run')
  config.tokenizer.update(kind='wordpiece', vocab_size=8192)
  with pytest.raises(ConfigError, match="tokenizer.kind='wordpiece'"):
    train.run(config, tmp_path / 'run')
  config.tokenizer.update(kind='bpe', vocab_size=5000)  # more than the tiny corpus can learn
  with pytest.raises(ConfigError, match='tokenizer.vocab_size=5000: this corpus has only'):
    train.run(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists() or not any((tmp_path / 'run').iterdir())


def test_a_run_starts_from_hugging_face_weights(config, tmp_path, capsys):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from lm.tasks import clm

  def llama(vocab_size):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():  # large weights: a loss far from a fresh model's log(V)
      for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p))
    return model.eval()
  theirs = llama(400)  # the byte tokenizer's 369 ids fit
  theirs.save_pretrained(tmp_path / 'hf')
  # One step at a negligible learning rate: the final validation is that of the HF model.
  config.model.scan_layers = True  # the checkpoint's layers are stacked for nn.scan
  config.train.update(init_from=str(tmp_path / 'hf'), steps=1, learning_rate=1e-12,
                      warmup_steps=0, eval_every=100)
  result = train.run(config, tmp_path / 'run')
  out = capsys.readouterr().out
  assert 'the model is the checkpoint\'s (' in out and 'num_heads 2 -> 4' in out
  assert 'starting from the weights of' in out
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())['model']
  assert (saved['vocab_size'], saved['num_heads'], saved['scan_layers']) == (400, 4, True)

  r = train.setup(config, tmp_path / 'run')
  nll, count = 0.0, 0
  for batch in clm.eval_batches(r.splits['val'].tokens, seq_len=32, batch_size=8,
                                pad_id=r.tokenizer.pad_id):
    with torch.no_grad():
      logits = theirs(torch.tensor(np.asarray(batch['inputs']))).logits.double()
    targets = torch.tensor(np.asarray(batch['targets'])).long()
    mask = targets != r.tokenizer.pad_id
    token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0),
                                                  reduction='none')
    nll, count = nll + float(token_nll[mask].sum()), count + int(mask.sum())
  assert abs(nll / count - np.log(400)) > 0.5
  np.testing.assert_allclose(result['val/loss'], nll / count, rtol=1e-4)

  llama(100).save_pretrained(tmp_path / 'small')
  config.train.init_from = str(tmp_path / 'small')
  with pytest.raises(ConfigError, match=r"tokenizer\.kind='bytes': its 369 ids do not fit the "
                                        r"100-row embedding of train\.init_from="):
    train.run(config, tmp_path / 'other')
  config.train.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(ConfigError, match=r"train\.init_from='.*nowhere': no such directory"):
    train.run(config, tmp_path / 'other')
  assert not (tmp_path / 'other').exists()


def sample_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'lm.sample', *args], cwd=ROOT, text=True,
                        capture_output=True, timeout=300)


def sample_in_process(capsys, *args: str) -> tuple[int, str, str]:
  from lm import sample
  try:
    sample.main(list(args))
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_sample_cli_on_a_run_and_its_mistakes(trained, tmp_path, capsys):
  from lm import hf, sampling, tokenizers
  _, workdir = trained  # a run of 4 steps at tmp_path / 'run'
  greedy = sample_cli(f'--workdir={workdir}', '--prompt=def ', '--max_new_tokens=12',
                      '--temperature=0')
  assert greedy.returncode == 0, greedy.stderr
  # The CLI's text is the greedy continuation of BOS + prompt by the checkpoint's params.
  cfg, params, tok = load.model(workdir)
  ids = sampling.generate(cfg, params, [[tok.bos_id, *tok.encode('def ')]], max_new_tokens=12,
                          eos_id=tok.eos_id).tokens[0]
  assert greedy.stdout == 'def ' + tok.decode(ids) + '\n'
  capsys.readouterr()
  code, out, err = sample_in_process(capsys, f'--workdir={workdir}', '--prompt=def ',
                                     '--max_new_tokens=12', '--temperature=0', '--stream')
  assert code == 0 and out == greedy.stdout, err  # the same text, streamed
  code, out, err = sample_in_process(capsys, f'--workdir={workdir}', '--prompt=',
                                     '--max_new_tokens=6', '--num_beams=3')
  assert code == 0 and '[beam score ' in out, err
  # A Hugging Face directory, with the run's tokenizer named.
  hf.save(cfg, params, tmp_path / 'hf')
  code, out, err = sample_in_process(capsys, f'--workdir={tmp_path / "hf"}',
                                     f'--tokenizer={workdir / "tokenizer"}', '--prompt=def ',
                                     '--max_new_tokens=12', '--temperature=0')
  assert out == greedy.stdout, err
  assert tokenizers.load(workdir / 'tokenizer').vocab_size == cfg.vocab_size

  for args, message in [
      ([f'--workdir={tmp_path / "hf"}'], 'is a Hugging Face directory: name its tokenizer'),
      ([f'--workdir={tmp_path}'], 'no config.json'),
      ([f'--workdir={workdir}', '--top_p=1.5'], 'top_p=1.5: must be in (0, 1]'),
      ([f'--workdir={workdir}', '--temperature=-1'], 'temperature=-1.0: must be >= 0'),
      ([f'--workdir={workdir}', '--num_beams=0'], 'num_beams=0: must be an integer >= 1'),
      ([f'--workdir={workdir}', '--num_beams=2', '--top_k=5'], 'beam search is deterministic'),
      ([f'--workdir={workdir}', '--prompt=' + 'x' * 40, '--max_new_tokens=4'],
       'exceeds the model context 32'),
  ]:
    code, _, err = sample_in_process(capsys, *args)
    assert code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
  code, _, err = sample_in_process(capsys, f'--workdir={workdir}', '--prompt=' + 'x' * 40,
                                   '--max_new_tokens=4', '--truncate')
  assert code == 0, err
  shutil.rmtree(workdir / 'checkpoints')
  code, _, err = sample_in_process(capsys, f'--workdir={workdir}')
  assert code == 2 and 'holds no checkpoint yet' in err


def test_eval_stride_adds_a_second_held_out_figure_to_a_finished_run(trained, capsys):
  config, workdir = trained  # finished: running it again only evaluates (eval.stride may change)
  config.eval.stride = config.data.seq_len  # windows that would not overlap: no second figure
  assert 'val/strided_bpb' not in train.run(config, workdir)
  config.eval.stride = 8
  capsys.readouterr()
  result = train.run(config, workdir)
  assert 'model, strided' in capsys.readouterr().out
  assert np.isfinite(result['val/strided_bpb']) and result['val/strided_bpb'] != result['val/bpb']
