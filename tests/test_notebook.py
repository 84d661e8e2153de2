"""The Colab TPU notebook runs top to bottom on a CPU with every run shrunk to seconds
(LM_NOTEBOOK_SMOKE=1): any cell's error fails the test; its outputs are not stored in the file."""
from __future__ import annotations

import json

import nbclient
import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / 'experiments' / 'colab_tpu.ipynb'


def test_the_notebook_is_stored_without_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  code = [c for c in nb['cells'] if c['cell_type'] == 'code']
  assert code and all(not c['outputs'] and c['execution_count'] is None for c in code)


@pytest.mark.slow
def test_the_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv('LM_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('LM_NOTEBOOK_RUNS', str(tmp_path / 'runs'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(ROOT)}}).execute()
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs)
  assert 'cpu' in text and "'val/bpb'" in text  # the devices, the pretraining run's figures
  assert (tmp_path / 'runs' / 'sft' / 'metrics.jsonl').is_file()
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # the learning curve and the comparison
  assert "{'llama':" in text and "'hybrid MMMG':" in text
