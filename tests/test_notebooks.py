"""experiments/notebooks run headless top to bottom, as on a fresh clone, and every plot draws.

Each notebook gets an empty checkpoint folder, so it first trains its tiny experiment
for a few steps, then inspects that checkpoint.
"""

import re

import nbclient
import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = ROOT / 'experiments' / 'notebooks'


@pytest.mark.slow
@pytest.mark.parametrize('name', ['inspect_cwm', 'inspect_enigma'])
def test_notebook_runs_and_every_plot_draws(name, tmp_path):
  nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  assert not any(cell.get('outputs') for cell in nb.cells if cell.cell_type == 'code'), \
      'notebooks are committed without outputs'
  setup = next(cell for cell in nb.cells if cell.cell_type == 'code')
  assert re.search(r'^CHECKPOINT = ', setup.source, re.M), \
      'the first code cell names the checkpoint'
  setup.source = re.sub(r'^CHECKPOINT = .*$', f'CHECKPOINT = {str(tmp_path / "run")!r}',
                        setup.source, count=1, flags=re.M)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
  plotting = [cell for cell in nb.cells if cell.cell_type == 'code' and 'plt.' in cell.source]
  assert len(plotting) >= 4, f'{name}: only {len(plotting)} plotting cells'
  for cell in plotting:
    images = [o for o in cell.outputs if 'image/png' in o.get('data', {})]
    assert images, f'{name}: a plotting cell drew nothing:\n{cell.source[:300]}'
  assert (tmp_path / 'run' / 'checkpoints').is_dir()   # it trained into the empty folder
