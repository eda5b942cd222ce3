"""The whole DAG through the LocalDagRunner on a small slice of the bundled sample."""

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

import configs
import pipeline
from evaluation import artifacts
from evaluation import run_summary
from servable import requests as requests_lib
from conftest import E2E_FLAGS, E2E_USERS as N_USERS, run_pipeline

pytestmark = pytest.mark.e2e


def _run(data_dir, output):
  return run_pipeline(data_dir, output)


def _executions(output):
  config = metadata_store_pb2.ConnectionConfig()
  config.sqlite.filename_uri = os.path.join(output, 'pipeline_root', 'metadata.db')
  store = metadata_store.MetadataStore(config)
  states = {}
  for node in configs.NODE_IDS.values():
    context = store.get_context_by_type_and_name('node', f'{configs.PIPELINE_NAME}.{node}')
    executions = sorted(store.get_executions_by_context(context.id), key=lambda e: e.id)
    states[node] = [e.last_known_state for e in executions]
  return states


@pytest.fixture(scope='module')
def first_run(e2e_run):
  return e2e_run


@pytest.fixture(scope='module')
def small_data(e2e_data):
  return e2e_data


def test_every_component_executed(first_run):
  output, _ = first_run
  # The first run's executions (later tests may run into the same root first).
  for node, states in _executions(output).items():
    assert states[0] == metadata_store_pb2.Execution.COMPLETE, node


def test_summary_metrics_and_split(first_run, small_data):
  output, summary = first_run
  assert summary['data']['users'] == N_USERS
  assert summary['data']['interactions'] == len(small_data[1])
  for model in (summary['metrics']['trained'], summary['metrics']['baselines']['popularity']):
    assert model['users'] == summary['data']['test_users'] > 0
    for key in ('recall@10', 'ndcg@10', 'mrr@10', 'recall@50', 'recall@100'):
      assert 0.0 <= model[key] <= 1.0, key
    assert model['recall@10'] <= model['recall@50'] <= model['recall@100']
    assert model['mrr@10'] <= model['ndcg@10'] <= model['recall@10']
  assert summary['metrics']['trained']['recall@100'] > 0.05
  assert set(summary['timings']) == set(configs.NODE_IDS.values()) | {'total'}
  assert summary['machine']['cores'] == os.cpu_count() and summary['machine']['cpu']
  test = pd.read_csv(output / 'split' / 'test.csv', dtype=str)
  assert len(test) == summary['data']['test_users']


def test_model_was_pushed_and_serves(first_run, small_data):
  output, summary = first_run
  assert summary['blessed'] is True
  pushed = summary['pushed_model']
  assert os.path.dirname(pushed) == str(output / 'serving' / 'recommender')
  assert os.path.isfile(os.path.join(pushed, 'saved_model.pb'))
  serve = tf.saved_model.load(pushed).signatures['serving_default']
  interactions = small_data[1]
  user = interactions['user_id'].iloc[0]
  seen = list(interactions[interactions['user_id'] == user]['item_id'].unique()[-3:])
  requests = {
      'known user': ([user], [seen]),
      'unknown user': (['no-such-user'], [seen]),
      'empty history': ([user], [['', '', '']]),
      'unknown history items': (['no-such-user'], [['nope', '', '']]),
  }
  for name, (users, history) in requests.items():
    result = serve(user_id=tf.constant(users), history=tf.constant(history),
                   query=tf.constant(['']))
    ids = result['item_ids'].numpy()
    scores = result['scores'].numpy()
    assert ids.shape == (1, 10) and scores.shape == (1, 10), name
    assert scores.dtype == np.float32 and np.all(np.diff(scores[0]) <= 0), name
    assert np.all(np.isfinite(scores)), name
    assert not set(i.decode() for i in ids[0]) & set(history[0]), name


def test_second_run_is_served_from_the_cache(first_run, small_data):
  output, first = first_run
  assert _run(small_data[0], output) == 0
  for node, states in _executions(output).items():
    assert states[-1] == metadata_store_pb2.Execution.CACHED, node
  with open(output / 'run_summary.json') as f:
    second = json.load(f)
  assert second['metrics'] == first['metrics']
  assert second['pushed_model'] == first['pushed_model']


def test_model_below_the_floor_is_not_pushed(first_run, small_data, capsys):
  output, first = first_run
  versions = os.listdir(output / 'serving' / 'recommender')
  status = run_pipeline(small_data[0], output, '--min-recall-at-10', '0.99')
  assert status == pipeline.EXIT_NOT_BLESSED == 3
  out = capsys.readouterr().out
  assert '[Pusher] skipped (condition not met)' in out
  verdict = out.strip().splitlines()[-1]
  assert verdict.startswith('verdict: NOT blessed, nothing pushed: recall@10'), verdict
  assert 'below the floor 0.99' in verdict, verdict
  with open(output / 'run_summary.json') as f:
    summary = json.load(f)
  assert summary['blessed'] is False and summary['pushed_model'] is None
  assert summary['metrics']['trained'] == first['metrics']['trained']
  assert any('recall@10' in reason and '0.99' in reason
             for reason in summary['not_blessed_because'])
  assert os.listdir(output / 'serving' / 'recommender') == versions
  # make run's demo step then says that nothing was pushed and why, and is no error.
  from serving import demo  # pylint: disable=import-outside-toplevel
  assert demo.main(['--output', str(output)]) == 0
  out = capsys.readouterr().out
  assert 'nothing was pushed' in out and 'below the floor 0.99' in out


def test_the_baselines_run_in_the_dag_and_gate_on_validation(first_run):
  """The Baselines component's classic recommenders are in the summary; the gate (off in
  E2E_FLAGS) compared the compressed model's validation recall@10 with the best of them."""
  output, summary = first_run
  assert set(summary['metrics']['baselines']) == {'popularity', 'itemknn', 'als'}
  gate = summary['baseline_gate']
  for name, entry in summary['metrics']['baselines'].items():
    assert entry['users'] == summary['data']['test_users'], name
    assert 0 < gate['baselines'][name]['validation_recall@10'] <= 1, name
  best = max(gate['baselines'], key=lambda n: gate['baselines'][n]['validation_recall@10'])
  assert gate['best_baseline'] == best
  assert gate['best_baseline_validation_recall@10'] == (
      gate['baselines'][best]['validation_recall@10'])
  reader = run_summary.RunReader(str(output / 'pipeline_root' / 'metadata.db'), 'recommender')
  report = artifacts.read_compression_report(reader.output_uri('Compressor', 'report'))
  assert gate['candidate_validation_recall@10'] == (
      report['compressed']['quality']['eval']['recall@10'])
  assert gate['checked'] is False and gate['blessed'] is True
  assert gate['reason'].startswith('baseline gate off')


def test_model_that_does_not_beat_the_baselines_is_not_pushed(first_run, small_data, capsys):
  output, first = first_run
  versions = os.listdir(output / 'serving' / 'recommender')
  # A lift no model reaches (recall is at most 1): the gate must refuse whatever was trained.
  status = run_pipeline(small_data[0], output, '--min-baseline-lift', '10')
  assert status == pipeline.EXIT_NOT_BLESSED
  out = capsys.readouterr().out
  assert '[Pusher] skipped (condition not met)' in out
  assert '[Trainer] cached' in out and '[Baselines] cached' in out
  with open(output / 'run_summary.json') as f:
    summary = json.load(f)
  gate = summary['baseline_gate']
  assert summary['blessed'] is False and summary['pushed_model'] is None
  assert gate['evaluator_blessed'] is True and gate['checked'] is True
  verdict = out.strip().splitlines()[-1]
  assert verdict.startswith('verdict: NOT blessed, nothing pushed: does not beat the classic '
                            'baselines'), verdict
  assert (f"{gate['candidate_validation_recall@10']:.4f} vs best baseline "
          f"{gate['best_baseline']} {gate['best_baseline_validation_recall@10']:.4f}") in verdict
  assert summary['metrics'] == first['metrics']
  assert os.listdir(output / 'serving' / 'recommender') == versions


def _test_requests(examples_uri):
  """The test split's examples and one recommendation request of all of them (the whole
  history, as eval_ranks excludes it; no query)."""
  from compression import benchmark  # pylint: disable=import-outside-toplevel
  serialized = benchmark.split_records(os.path.join(examples_uri, 'Split-test'))
  return serialized, benchmark.requests(serialized, benchmark.RECOMMEND, len(serialized),
                                        10**6, 1)[0]


def _serving_agreement(model_dir, examples_uri, signature='serving_default'):
  """Share of test examples where eval_ranks agrees with what `signature` returns: a
  target of rank r <= 10 is its r-th item, a target of rank > 10 is not among them."""
  from compression import benchmark  # pylint: disable=import-outside-toplevel
  serialized, request = _test_requests(examples_uri)
  model = tf.saved_model.load(model_dir)
  ranks = benchmark.ranks(model, serialized)
  returned = model.signatures[signature](**request)['item_ids'].numpy().astype(str)
  targets = [tf.train.Example.FromString(s).features.feature['item_id'].bytes_list.value[0]
             .decode() for s in serialized]
  agree = [(row[int(rank) - 1] == target) if rank <= len(row) else (target not in row)
           for rank, row, target in zip(ranks, returned, targets)]
  return float(np.mean(agree)), float(np.mean(ranks <= 10))


def test_the_compressed_model_is_gated_and_pushed(first_run):
  output, summary = first_run
  compressed, trained = summary['metrics']['compressed'], summary['metrics']['trained']
  assert compressed['users'] == trained['users'] == summary['data']['test_users']
  compression = summary['compression']
  assert compression['size_ratio'] > 2
  assert compression['test_recall_retention'] == pytest.approx(
      compressed['recall@10'] / trained['recall@10'])
  for key in ('speedup_batch1', 'speedup_search_batch1', 'recall_retention'):
    assert compression[key] > 0, key
  assert os.path.isfile(compression['report'])
  # What was pushed is the Compressor's model: its bytes, not the Trainer's.
  from compression import export as export_lib  # pylint: disable=import-outside-toplevel
  assert export_lib.directory_bytes(summary['pushed_model']) == (
      compression['compressed']['bytes'])
  for section in ('search', 'cold_start'):
    assert set(summary[section]) >= {'trained', 'compressed'}, section
  reader = run_summary.RunReader(str(output / 'pipeline_root' / 'metadata.db'), 'recommender')
  # eval_ranks ranks by brute force: recommend_exact is what it must agree with.
  agreement, recall = _serving_agreement(summary['pushed_model'],
                                         reader.output_uri('SequenceExampleGen', 'examples'),
                                         requests_lib.EXACT_SIGNATURE)
  assert agreement >= 0.95 and recall == pytest.approx(compressed['recall@10'])


def test_the_pushed_index_returns_the_exact_top_10_it_reports(first_run):
  """The pushed model's serving_default answers from its approximate index (the e2e runs force
  it on): the Evaluator's index recall@10 on test passed the gate, and recomputed here from
  serving_default against recommend_exact on the same requests it is the same figure; history
  items are never returned and every returned score is the item's exact score."""
  from compression import ivf  # pylint: disable=import-outside-toplevel
  output, summary = first_run
  index = summary['compression']['index']
  assert index['used'] and 1 <= index['nprobe'] <= index['n_lists']
  assert index['test_index_recall@10'] >= pipeline.DEFAULT_MIN_INDEX_RECALL
  assert index['validation_index_recall@10'] >= 0.98  # the Compressor's target
  reader = run_summary.RunReader(str(output / 'pipeline_root' / 'metadata.db'), 'recommender')
  _, request = _test_requests(reader.output_uri('SequenceExampleGen', 'examples'))
  model = tf.saved_model.load(summary['pushed_model'])
  served = model.signatures['serving_default'](**request)
  exact = model.signatures[requests_lib.EXACT_SIGNATURE](**request)
  served_ids, exact_ids = served['item_ids'].numpy(), exact['item_ids'].numpy()
  assert ivf.overlap(exact_ids, served_ids).mean() == pytest.approx(
      index['test_index_recall@10'], abs=0.005)
  histories = request['history'].numpy()
  for row, history in zip(served_ids, histories):
    assert not set(row) & (set(history) - {b''})
  # A served item's score is its exact score (the same int8 rows), where both return it.
  for ids, scores, e_ids, e_scores in zip(served_ids, served['scores'].numpy(), exact_ids,
                                          exact['scores'].numpy()):
    exact_score = dict(zip(e_ids, e_scores))
    for item, score in zip(ids, scores):
      if item in exact_score:
        assert score == pytest.approx(exact_score[item], rel=1e-5, abs=1e-5)


def test_compressed_model_that_lost_recall_is_not_blessed_or_pushed(first_run,
                                                                    over_compressed_run):
  """An over-compressed model (conftest.over_compressed_run) against the default 98% gate:
  refused, the reason printed, nothing pushed. (A 99%-sparse model is no test here: it
  collapses to a near-constant ranking that holds POST, the target of a quarter of this
  slice's test users, and beats the trained model.)
  """
  output, first = first_run
  status, out, summary, versions = over_compressed_run
  assert status == pipeline.EXIT_NOT_BLESSED
  assert '[Compressor] done' in out and '[Evaluator] done' in out
  assert '[Pusher] skipped (condition not met)' in out
  assert summary['compression']['test_recall_retention'] < 0.98  # the premise
  assert summary['compression']['candidates_tried'] == 1
  assert summary['blessed'] is False and summary['pushed_model'] is None
  assert summary['metrics']['trained'] == first['metrics']['trained']
  assert any('keeps' in reason and 'needs at least 98.0%' in reason
             for reason in summary['not_blessed_because']), summary['not_blessed_because']
  assert 'NOT blessed: recall@10 (compressed)' in out
  assert out.strip().splitlines()[-1].startswith('verdict: NOT blessed, nothing pushed: ')
  assert sorted(os.listdir(output / 'serving' / 'recommender')) == versions


def test_validation_decided_the_trainers_epochs(first_run):
  """run_summary.json's `training`: the per-epoch curves, and the kept epoch is the best one on
  validation; the trained SavedModel ranks the eval split as the Trainer's validation did."""
  output, summary = first_run
  training = summary['training']
  curve = training['per_epoch']['val_recall@10']
  assert training['epochs_run'] == len(curve) == len(training['per_epoch']['loss'])
  assert 1 <= training['epochs_run'] <= training['max_epochs'] == int(E2E_FLAGS[1])
  assert training['best_epoch'] == int(np.argmax(curve)) + 1
  assert training['best_val_recall@10'] == max(curve)
  reader = run_summary.RunReader(str(output / 'pipeline_root' / 'metadata.db'), 'recommender')
  report = artifacts.read_compression_report(reader.output_uri('Compressor', 'report'))
  # The same ranks in-graph: Keras model in training, the exported eval_ranks in the
  # Compressor (float sums may order a near-tie differently: one user at most). The exported
  # model is the best epoch's with the id-embedding shrinkage validation chose.
  shrinkage = training['id_shrinkage']
  assert shrinkage['validation_recall@10']['0'] == training['best_val_recall@10']
  assert training['val_recall@10'] == max(shrinkage['validation_recall@10'].values())
  validation = report['trained_validation']
  assert validation['recall@10'] == pytest.approx(training['val_recall@10'],
                                                  abs=1.0 / validation['users'])


def test_search_and_cold_start_metrics_are_reported(first_run):
  _, summary = first_run
  search = summary['search']['trained']
  assert search['users'] == summary['data']['test_users']
  assert 0.0 <= search['mrr@10'] <= search['ndcg@10'] <= search['recall@10'] <= 1.0
  # Queries are title words of the target: text retrieval does far better than chance (10 of
  # a catalog of ~1,900 items).
  assert search['recall@10'] > 0.2
  cold = summary['cold_start']['trained']
  assert 0 < cold['users'] < summary['data']['test_users']
  assert 0.0 <= cold['recall@10'] <= cold['recall@100'] <= 1.0


def test_a_full_title_query_returns_its_item(first_run, e2e_data):
  """Search (query, no user, no history) through serving_default, items drawn at random."""
  _, summary = first_run
  serve = tf.saved_model.load(summary['pushed_model']).signatures['serving_default']
  items = pd.read_csv(e2e_data[0] / 'items.csv', dtype=str, keep_default_na=False)
  items = items.sample(n=20, random_state=0)
  result = serve(user_id=tf.constant([''] * len(items)),
                 history=tf.constant([['']] * len(items)),
                 query=tf.constant(list(items['title'])))
  found = [item in [i.decode() for i in row]
           for item, row in zip(items['item_id'], result['item_ids'].numpy())]
  assert sum(found) >= 18, list(items['title'][[not f for f in found]])


def test_recommend_k_answers_k_items_that_extend_serving_default(first_run):
  """recommend_k (k per request): its first K items are serving_default's, k is clipped to
  [1, min(MAX_K, catalog)], and a batch answers its largest k on every row."""
  _, summary = first_run
  model = tf.saved_model.load(summary['pushed_model'])
  serve, serve_k = model.signatures['serving_default'], model.signatures[requests_lib.K_SIGNATURE]
  request = {'user_id': tf.constant(['', 'nobody']), 'query': tf.constant(['', 'red heart']),
             'history': tf.constant([['', '', ''], ['', '85123A', '71053']])}
  base = serve(**request)
  wide = serve_k(**request, k=tf.constant([25, 3], tf.int32))
  assert wide['item_ids'].shape == (2, 25)
  np.testing.assert_array_equal(wide['item_ids'].numpy()[:, :10], base['item_ids'].numpy())
  np.testing.assert_allclose(wide['scores'].numpy()[:, :10], base['scores'].numpy(), rtol=1e-6)
  assert serve_k(**request, k=tf.constant([0, -5], tf.int32))['item_ids'].shape == (2, 1)
  widest = serve_k(**request, k=tf.constant([10**6, 1], tf.int32))['item_ids'].shape[1]
  assert 25 < widest <= requests_lib.MAX_K  # the catalog or MAX_K, whichever is smaller
  assert serve_k(**request, k=tf.constant([widest + 1, 1], tf.int32))['item_ids'].shape[1] == (
      widest)


def test_the_pushed_model_serves_over_grpc_and_through_the_realtime_service(first_run,
                                                                            small_data):
  """The version the pipeline pushed (published whole: no staging directory is left) is
  served by the model server over the real gRPC and REST APIs, and by the real-time service,
  whose events change the next recommendation; both agree with the SavedModel in-process."""
  import requests  # pylint: disable=import-outside-toplevel
  import serving_fixtures as fx  # pylint: disable=import-outside-toplevel
  from serving import client as client_lib  # pylint: disable=import-outside-toplevel
  from serving.realtime import service as service_lib  # pylint: disable=import-outside-toplevel
  output, summary = first_run
  base = output / 'serving' / 'recommender'
  assert os.path.basename(summary['pushed_model']) in os.listdir(base)
  assert all(name.isdigit() for name in os.listdir(base))  # no staging directory left
  interactions, items_csv = small_data[1], str(small_data[0] / 'items.csv')
  user = str(interactions['user_id'].iloc[0])
  history = [str(i) for i in interactions[interactions['user_id'] == user]['item_id']
             .unique()[-3:]]
  serve = tf.saved_model.load(summary['pushed_model']).signatures['serving_default']
  expected = serve(**{k: tf.make_ndarray(v) for k, v in
                      client_lib.predict_request([user], [history]).inputs.items()})
  expected_ids = [i.decode() for i in expected['item_ids'].numpy()[0]]
  server = fx.start_local(['--model_name=recommender', f'--model_base_path={base}'])
  service = service_lib.build_service(server.target, items_csv)
  http = service_lib.HttpServer(service, port=0).start()
  service.start()
  try:
    with client_lib.RecommenderClient(server.target, 'recommender') as grpc_client:
      top = grpc_client.recommend(user, history, k=10)
      wide = grpc_client.recommend(user, history, k=50)  # beyond K: recommend_k
    assert [item for item, _ in top] == expected_ids
    assert len(wide) == 50 and [item for item, _ in wide[:10]] == expected_ids
    np.testing.assert_allclose([s for _, s in top], expected['scores'].numpy()[0], rtol=1e-5)
    rest = requests.post(f'{server.rest_url}/v1/models/recommender:predict', timeout=30, json={
        'instances': [{'user_id': user, 'history': [''] + history, 'query': ''}]}).json()
    assert rest['predictions'][0]['item_ids'] == expected_ids
    for n, item in enumerate(history):
      answer = requests.post(f'{http.url}/events', timeout=30, json={
          'user_id': user, 'item_id': item, 'timestamp': 1_300_000_000 + n})
      assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 30
    while service.history(user)[0][-1:] != history[-1:] and time.monotonic() < deadline:
      time.sleep(0.1)
    answer = requests.get(f'{http.url}/recommend', params={'user': user, 'k': 10},
                          timeout=30).json()
    assert answer['history'] == history
    assert [i['item_id'] for i in answer['items']] == expected_ids
    answer = requests.get(f'{http.url}/recommend', params={'user': user, 'k': 40},
                          timeout=30).json()
    assert answer['k_served'] == 40 and [i['item_id'] for i in answer['items'][:10]] == (
        expected_ids)
  finally:
    http.stop()
    service.close()
    server.stop()
