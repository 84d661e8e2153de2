"""Fill-in-the-middle: the layouts by hand, the cut points' distribution, the transform in the
grain pipeline (deterministic, resumable), infill on a model trained to fill a pattern."""
from __future__ import annotations

import numpy as np
import pytest

from lm import checkpoint, load, sample, sampling, tokenizers, train
from lm.config import ConfigError
from lm.data import fim
from lm.tasks import clm

from .conftest import tiny_config

TOK = tokenizers.load('bytes')
S = TOK.special_ids


def test_psm_and_spm_layouts_by_hand():
  psm = fim.arrange(TOK, 'ab', 'c', 'de', spm=False)
  assert psm == [S['fim_prefix'], 97, 98, S['fim_suffix'], 100, 101, S['fim_middle'], 99]
  spm = fim.arrange(TOK, 'ab', 'c', 'de', spm=True)
  assert spm == [S['fim_suffix'], 100, 101, S['fim_prefix'], 97, 98, S['fim_middle'], 99]
  rng = np.random.default_rng(0)
  window = np.array([TOK.bos_id, *b'abcde', TOK.eos_id, TOK.bos_id, *b'xy'])
  out, valid = fim.transform(window, rng, TOK, fim_rate=1.0, spm_rate=0.0)
  # every fragment rearranged (PSM), the length kept: the sentinels push the tail out
  assert len(out) == len(window) and valid.all()
  assert out[0] == TOK.bos_id and out[1] == S['fim_prefix']
  assert sorted(TOK.decode(out[1:9])) == list('abcde')  # its 5 characters and 3 sentinels
  assert out[9:].tolist() == [TOK.eos_id]  # the second document is pushed out
  out, valid = fim.transform(window, rng, TOK, fim_rate=0.0, spm_rate=0.0)
  assert out.tolist() == window.tolist() and valid.all()


def test_infill_prompts_are_a_documents_layout_up_to_its_middle():
  assert sampling.infill_prompt(TOK, 'ab', 'de') == [
      TOK.bos_id, S['fim_prefix'], 97, 98, S['fim_suffix'], 100, 101, S['fim_middle']]
  assert sampling.infill_prompt(TOK, 'ab', 'de', spm=True) == [
      TOK.bos_id, S['fim_suffix'], 100, 101, S['fim_prefix'], 97, 98, S['fim_middle']]


def test_a_rearranged_document_holds_its_text_and_ends_with_the_middle_then_eos():
  rng = np.random.default_rng(1)
  for _ in range(50):
    window = np.array([TOK.bos_id, *b'0123456789', TOK.eos_id] + [TOK.pad_id] * 5)
    out, valid = fim.transform(window, rng, TOK, fim_rate=1.0, spm_rate=0.5)
    ids = out[valid].tolist()
    eos = ids.index(TOK.eos_id)
    mid = ids.index(S['fim_middle'])
    pre, suf = ids.index(S['fim_prefix']), ids.index(S['fim_suffix'])
    prefix = TOK.decode(ids[pre + 1:suf if pre < suf else mid])
    suffix = TOK.decode(ids[suf + 1:mid if pre < suf else pre])
    middle = TOK.decode(ids[mid + 1:eos])
    assert prefix + middle + suffix == '0123456789'


def test_the_cut_points_are_two_sorted_uniform_draws():
  rng = np.random.default_rng(0)
  n, draws = 20, 20000
  cuts = np.array([[len(p), len(p) + len(m)] for p, m, _ in
                   (fim.cut('x' * n, rng) for _ in range(draws))])
  assert (cuts[:, 0] <= cuts[:, 1]).all() and cuts.min() == 0 and cuts.max() == n
  # the min and max of two uniform draws on {0..n}: means n/3 and 2n/3 (about, for integers)
  want_low = sum(k * ((n + 1 - k) ** 2 - (n - k) ** 2) for k in range(n + 1)) / (n + 1) ** 2
  np.testing.assert_allclose(cuts[:, 0].mean(), want_low, atol=0.15)
  np.testing.assert_allclose(cuts[:, 1].mean(), n - want_low, atol=0.15)
  # every point equally likely as one of the two draws
  counts = np.bincount(cuts.ravel(), minlength=n + 1) / (2 * draws)
  np.testing.assert_allclose(counts, 1 / (n + 1), atol=0.006)


def test_line_cuts_fall_at_line_starts_each_equally_likely(config, tmp_path):
  text = 'ab\ncd\n\nef'
  assert fim.cut_points(text, 'line') == [0, 3, 6, 7, 9]
  assert fim.cut_points('x\n', 'line') == [0, 2] and fim.cut_points('', 'line') == [0]
  rng, draws = np.random.default_rng(0), 20000
  cuts = [fim.cut(text, rng, 'line') for _ in range(draws)]
  assert all(p + m + s == text for p, m, s in cuts)
  ends = np.array([[len(p), len(p) + len(m)] for p, m, _ in cuts])
  counts = np.array([np.sum(ends == point) for point in (0, 3, 6, 7, 9)]) / (2 * draws)
  np.testing.assert_allclose(counts, 0.2, atol=0.01)  # 5 points, each as likely
  window = np.array([TOK.bos_id, *b'ab\ncd\nef', TOK.eos_id] + [TOK.pad_id] * 3)
  out, _ = fim.transform(window, np.random.default_rng(1), TOK, fim_rate=1.0, spm_rate=0.0,
                         unit='line')
  ids = out.tolist()
  middle = TOK.decode(ids[ids.index(S['fim_middle']) + 1:ids.index(TOK.eos_id)])
  assert middle in ('', 'ab\n', 'cd\n', 'ef', 'ab\ncd\n', 'cd\nef', 'ab\ncd\nef')
  config.data.fim_unit = 'word'
  with pytest.raises(ConfigError, match=r"data.fim_unit='word': use one of \('char', 'line'\)"):
    train.setup(config, tmp_path / 'never')


def test_the_fim_pipeline_is_deterministic_draws_afresh_each_epoch_and_resumes():
  tokens = np.array(([TOK.bos_id, *b'abcdefghij', TOK.eos_id]) * 8, np.int32)  # 96 tokens
  make = lambda: iter(clm.train_dataset(tokens, seq_len=11, batch_size=2, seed=3, tokenizer=TOK,
                                        fim_rate=0.5, fim_spm_rate=0.5))
  it = make()
  batches = [next(it) for _ in range(16)]  # 4 epochs of 8 windows
  rearranged = [(b['inputs'] == S['fim_middle']).any(-1) for b in batches]
  share = np.mean(np.concatenate(rearranged))
  assert 0.2 < share < 0.8
  epoch = lambda e: sorted(tuple(row) for b in batches[4 * e:4 * e + 4] for row in b['inputs'])
  assert epoch(0) != epoch(1)  # drawn afresh
  again = make()
  for b in batches[:5]:
    np.testing.assert_array_equal(next(again)['inputs'], b['inputs'])
  state = again.get_state()
  resumed = make()
  resumed.set_state(state)
  for b in batches[5:]:
    got = next(resumed)
    for k in b:
      np.testing.assert_array_equal(got[k], b[k])


def test_bad_fim_rates_are_refused(config, tmp_path):
  for key, value, message in (('fim_rate', 1.5, r'data.fim_rate=1.5: a probability'),
                              ('fim_spm_rate', -0.1, r'data.fim_spm_rate=-0.1: a probability')):
    config.data[key] = value
    with pytest.raises(ConfigError, match=message):
      train.setup(config, tmp_path / 'never')
    config.data[key] = 0.0
  assert not (tmp_path / 'never').exists()


@pytest.mark.slow
def test_infill_fills_the_middle_of_a_pattern_the_model_was_trained_on(tmp_path, capsys):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(40):
    (corpus / f'{i}.txt').write_text('abcdefghijklmnopqrstuvwxyz\n')
  c = tiny_config(corpus, tmp_path / 'cache', steps=800, learning_rate=1e-2, eval_every=1000,
                  checkpoint_every=1000, log_every=100)
  c.data.update(paths=str(corpus / '*.txt'), fim_rate=0.9, val_fraction=0.2, seq_len=64)
  c.model.max_len = 64
  train.run(c, tmp_path / 'run')
  cfg, params, tok = load.model(tmp_path / 'run')
  cases = [('abcdefgh', 'lmnopqrstuvwxyz\n', 'ijk'), ('abc', 'ghijklmnopqrstuvwxyz\n', 'def'),
           ('abcdefghijklmnop', 'tuvwxyz\n', 'qrs')]
  got = [sampling.infill(cfg, params, tok, prefix, suffix, max_new_tokens=8)
         for prefix, suffix, _ in cases]
  assert got == [middle for _, _, middle in cases]
  capsys.readouterr()
  sample.main([f'--workdir={tmp_path / "run"}', '--prefix=abc',
               '--suffix=ghijklmnopqrstuvwxyz\n', '--max_new_tokens=8', '--temperature=0'])
  assert capsys.readouterr().out == 'def\n'
