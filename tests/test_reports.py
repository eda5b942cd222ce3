"""The review tools on the e2e run's pipeline root: both notebooks headless, the HTML report.

The notebooks run with nbclient in a kernel started from this interpreter (a kernel spec
written to a temporary directory whose argv is sys.executable -m ipykernel_launcher), so the
test needs no kernel installed for the user and runs the venv's packages.
"""

import asyncio
import json
import os
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

import pipeline

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, 'notebooks')
KERNEL = 'recommender-test-venv'


def _kernel_spec_dir(directory, pipeline_root):
  """A kernel spec for this interpreter, with the notebooks' parameters in its environment."""
  spec_dir = directory / KERNEL
  spec_dir.mkdir(parents=True)
  env = {'PIPELINE_ROOT': str(pipeline_root), 'TF_USE_LEGACY_KERAS': '1',
         'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONHASHSEED': '0',
         # No front end is attached: the notebook shows tables and plots, not TFMA's widgets.
         'TFMA_WIDGETS': os.environ.get('TEST_TFMA_WIDGETS', '0')}
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'recommender venv (tests)', 'language': 'python', 'env': env}))
  return str(directory)


async def _execute(path, kernel_dirs):
  notebook = nbformat.read(path, as_version=4)
  manager = AsyncKernelManager(kernel_name=KERNEL,
                               kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dirs]))
  client = NotebookClient(notebook, km=manager, timeout=600, allow_errors=False,
                          resources={'metadata': {'path': NOTEBOOKS}})
  try:
    await client.async_execute(cleanup_kc=True)
  finally:
    if await manager.is_alive():
      await manager.shutdown_kernel(now=True)
  return notebook


@pytest.fixture(scope='module')
def executed(e2e_run, tmp_path_factory):
  """Both notebooks, executed concurrently (each kernel spends most of its time importing)."""
  output, _ = e2e_run
  kernel_dirs = _kernel_spec_dir(tmp_path_factory.mktemp('kernels'), output / 'pipeline_root')
  names = ('evaluator_report.ipynb', 'run_history.ipynb')

  async def both():
    return await asyncio.gather(*(_execute(os.path.join(NOTEBOOKS, name), kernel_dirs)
                                  for name in names))

  return dict(zip(names, asyncio.run(both())))


def _outputs(notebook):
  """(all text of the outputs, number of PNG images, error outputs)."""
  texts, images, errors = [], 0, []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if output.output_type == 'error':
        errors.append(output)
      if output.output_type == 'stream':
        texts.append(output.text)
      data = output.get('data', {})
      texts.extend(data.get(kind, '') for kind in ('text/plain', 'text/html', 'text/markdown'))
      images += 'image/png' in data
  return '\n'.join(texts), images, errors


def _summary(output):
  # Read now: test_e2e's later runs rewrite it into the same output directory.
  with open(output / 'run_summary.json') as f:
    return json.load(f)


def _notebook_text(executed, name, output, model):
  """The executed notebook's text, checked to have run cleanly and to show `model`'s recall."""
  text, images, errors = _outputs(executed[name])
  assert not errors
  assert images >= 1
  summary = _summary(output)
  assert f"{summary['metrics'][model]['recall@10']:.4f}" in text
  return text, summary


def test_evaluator_report_notebook(executed, e2e_run):
  text, summary = _notebook_text(executed, 'evaluator_report.ipynb', e2e_run[0],
                                 'trained')
  # The notebook shows the Evaluator's blessing; the baseline gate may refuse what it blessed.
  evaluator_blessed = summary.get('baseline_gate', {}).get('evaluator_blessed',
                                                           summary['blessed'])
  assert ('Not blessed' if not evaluator_blessed else 'Blessed: all') in text
  # The gate compares the compressed model with the trained one.
  assert "Candidate 'compressed' was compared against baseline 'trained'" in text
  assert 'Overall' in text
  assert 'the tables and plots above are the report' in text  # TFMA_WIDGETS=0: no widgets


def test_run_history_notebook(executed, e2e_run):
  # Per run, the Evaluator's candidate: the compressed (pushed) model.
  text, _ = _notebook_text(executed, 'run_history.ipynb', e2e_run[0], 'compressed')
  assert re.search(r'\d+ run\(s\) of .recommender.', text)
  assert 'input_fingerprint' in text and 'pushed_version' in text


def test_html_report_has_the_runs_metrics_and_images(e2e_run, tmp_path, capsys):
  output, _ = e2e_run
  page_path = tmp_path / 'report.html'
  assert pipeline.main(['report', '--pipeline-root', str(output / 'pipeline_root'),
                        '--output', str(page_path)]) == 0
  assert str(page_path) in capsys.readouterr().out
  page = page_path.read_text()
  summary = _summary(output)
  metrics = summary['metrics']
  for model in (metrics['trained'], metrics['compressed'], metrics['baselines']['popularity']):
    for key in ('recall@10', 'ndcg@10', 'recall@100'):
      assert f'{model[key]:.4f}' in page, key
  images = re.findall(r'<img [^>]*src="([^"]*)"', page)
  assert len(images) >= 2 and all(src.startswith('data:image/png;base64,') for src in images)
  assert not re.search(r'(src|href)="(https?:|file:|/)', page)  # self-contained
  for section in ('Metrics per slice', 'Per-component timings', 'Quality against size and '
                  'latency', 'Compression report', 'size_ratio', 'test_recall_retention',
                  'Serving benchmark', 'Blessing', 'Baseline gate'):
    assert section in page, section
  assert 'Compression is absent' not in page  # the run's own compression section
  # The Trainer's curves: how validation decided the epochs.
  training = summary['training']
  assert (f"{training['epochs_run']} of at most {training['max_epochs']} epochs; the weights "
          f"of epoch {training['best_epoch']}") in page
  assert 'alt="training curves"' in page
  for node in ('Trainer', 'Evaluator'):
    assert f'<td>{node}</td>' in page, node


def test_html_report_renders_compression_and_benchmark_when_present(e2e_run, tmp_path):
  output, _ = e2e_run
  summary = _summary(output)
  summary['metrics']['compressed'] = dict(summary['metrics']['trained'], **{'recall@10': 0.1111})
  summary['compression'] = {'size_ratio': 4.5, 'speedup_batch1': 1.8,
                            'recall_retention': 0.97, 'quantized': ['item_embeddings']}
  summary_path = tmp_path / 'run_summary.json'
  summary_path.write_text(json.dumps(summary))
  benchmark_path = tmp_path / 'serving.json'
  benchmark_path.write_text(json.dumps({'grpc': {'batch1': {'p50_ms': 3.25, 'qps': 812.5}},
                                        'runs': [{'batch': 1, 'p99_ms': 9.75}]}))
  page_path = tmp_path / 'report.html'
  assert pipeline.main(['report', '--pipeline-root', str(output / 'pipeline_root'),
                        '--output', str(page_path), '--run-summary', str(summary_path),
                        '--benchmark', str(benchmark_path)]) == 0
  page = page_path.read_text()
  assert 'Compression is absent' not in page
  for text in ('size_ratio', '4.5000', 'speedup_batch1', 'item_embeddings', '0.1111',
               'grpc.batch1.p50_ms', '3.2500', 'p99_ms', '9.7500', 'relative to trained'):
    assert text in page, text
