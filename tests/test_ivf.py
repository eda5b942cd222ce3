"""The approximate top-K index (compression.ivf): lists, search, exclusion, choice, SavedModel."""

import numpy as np
import pytest
import tensorflow as tf

from compression import ivf
from compression import quantization


def _clustered(n_items, dim=16, clusters=40, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim)).astype(np.float32) * 2.0
  return (centers[rng.integers(0, clusters, n_items)] +
          0.5 * rng.normal(size=(n_items, dim))).astype(np.float32), centers


def _history(rows):
  """int64 SparseTensor [B, (H)] of item ids."""
  return tf.RaggedTensor.from_row_lengths(
      tf.constant([i for row in rows for i in row], tf.int64),
      [len(row) for row in rows]).to_sparse()


def test_lists_partition_the_catalog_the_same_way_every_time():
  vectors, _ = _clustered(3000)
  first = ivf.build_lists(vectors, 50, seed=3)
  second = ivf.build_lists(vectors, 50, seed=3)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  centroids, list_items, offsets = first
  assert centroids.shape == (50, 16)
  assert sorted(list_items.tolist()) == list(range(3000))  # every item in exactly one list
  assert offsets[0] == 0 and offsets[-1] == 3000 and np.all(np.diff(offsets) >= 0)


@pytest.mark.parametrize('quantized', [True, False])
def test_probing_every_list_is_brute_force_with_history_excluded(quantized):
  vectors, centers = _clustered(2000)
  base = quantization.CandidateIndex(vectors, quantized=quantized)
  centroids, list_items, offsets = ivf.build_lists(base.vectors(), 45, seed=0)
  index = ivf.IvfIndex(base, centroids, list_items, offsets, nprobe=45)
  # The index holds the base's vectors once, list by list: the same codes, moved.
  np.testing.assert_array_equal(index.by_list.vectors(), base.vectors()[list_items])
  np.testing.assert_allclose(index.scores(tf.constant(centers[:2])).numpy(),
                             base.scores(tf.constant(centers[:2])).numpy(), rtol=1e-6, atol=1e-6)
  rng = np.random.default_rng(1)
  query = tf.constant(centers[:6] + 0.1 * rng.normal(size=(6, 16)).astype(np.float32))
  exact_ids = ivf.exact_top_k(base, query, _history([[]] * 6), 10)[0].numpy()
  # Exclude each row's two best items (and an unknown id, N: the OOV bucket).
  history = _history([list(row[:2]) + [2000] for row in exact_ids])
  ids, scores = index.top_k(query, history, tf.constant(10))
  expected_ids, expected_scores = ivf.exact_top_k(base, query, history, 10)
  np.testing.assert_array_equal(ids.numpy(), expected_ids.numpy())
  np.testing.assert_allclose(scores.numpy(), expected_scores.numpy(), rtol=1e-5, atol=1e-5)
  for row, excluded in zip(ids.numpy(), exact_ids[:, :2]):
    assert not set(row) & set(excluded)


@pytest.mark.parametrize('max_pairs', [1 << 22, 0])  # every pair compared / binary search
def test_long_histories_are_excluded_exactly(monkeypatch, max_pairs):
  """Eval histories run to thousands of items: beyond MAX_COMPARED_PAIRS, exclusion is a
  binary search per candidate; both ways exclude exactly the same items."""
  monkeypatch.setattr(ivf, 'MAX_COMPARED_PAIRS', max_pairs)
  vectors, centers = _clustered(20000, clusters=100)
  base = quantization.CandidateIndex(vectors)
  index = ivf.IvfIndex(base, *ivf.build_lists(base.vectors(), 141, seed=0), nprobe=141)
  query = tf.constant(centers[:8])
  best = ivf.exact_top_k(base, query, _history([[]] * 8), 50)[0].numpy()
  rng = np.random.default_rng(3)
  # 3,000 items per row: every other of its 50 best, and random others.
  rows = [sorted(set(row[::2].tolist()) | set(rng.integers(0, 20000, 3000).tolist()))
          for row in best]
  history = _history(rows)
  ids, _ = index.search(query, history, tf.constant(10), tf.constant(141))
  expected, _ = ivf.exact_top_k(base, query, history, 10)
  np.testing.assert_array_equal(ids.numpy(), expected.numpy())
  for row, excluded in zip(ids.numpy(), rows):
    assert not set(row.tolist()) & set(excluded)


def test_a_batch_the_probed_lists_cannot_fill_is_answered_by_brute_force():
  vectors, centers = _clustered(400, clusters=20)
  base = quantization.CandidateIndex(vectors)
  index = ivf.IvfIndex(base, *ivf.build_lists(base.vectors(), 20, seed=0), nprobe=1)
  query, history = tf.constant(centers[:2]), _history([[], [3]])
  ids, scores = index.search(query, history, tf.constant(100), tf.constant(1))
  finite = np.isfinite(scores.numpy())
  assert finite[:, 0].all() and not finite[:, -1].all()  # one list holds fewer than 100
  ids, scores = index.top_k(query, history, tf.constant(100))
  expected_ids, _ = ivf.exact_top_k(base, query, history, 100)
  np.testing.assert_array_equal(ids.numpy(), expected_ids.numpy())
  assert np.isfinite(scores.numpy()).all()


def test_choose_uses_the_index_only_where_it_scans_little_and_reaches_the_target():
  vectors, centers = _clustered(20000, clusters=100)
  rng = np.random.default_rng(2)
  queries = (centers[rng.integers(0, 100, 64)] +
             0.3 * rng.normal(size=(64, 16))).astype(np.float32)
  history = _history([[int(i)] for i in rng.integers(0, 20000, 64)])
  base = quantization.CandidateIndex(vectors)
  report = ivf.choose(base, queries, history, target=0.9, n_lists=0, seed=0, latency_calls=3)
  index = report.pop('index')
  assert report['n_lists'] == 141  # round(sqrt(20000))
  assert report['used'] and index is not None and index.nprobe == report['nprobe']
  chosen = [r for r in report['rows'] if r['nprobe'] == report['nprobe']][0]
  assert chosen['index_recall@10'] >= 0.9
  assert chosen['scanned'] * ivf.SCAN_RATIO <= 20000
  nprobes = [r['nprobe'] for r in report['rows']]
  assert nprobes[:3] == [1, 2, 4]
  # The table stops one step past the first nprobe that reaches the target.
  assert nprobes[-2] == report['nprobe'] and nprobes[-1] == min(2 * report['nprobe'], 141)
  recalls = [r['index_recall@10'] for r in report['rows']]
  assert all(r < 0.9 for r in recalls[:-2]) and recalls[-1] >= recalls[-2] - 0.01

  small = quantization.CandidateIndex(vectors[:300])
  report = ivf.choose(small, queries, _history([[]] * 64), target=0.9, n_lists=0, seed=0,
                      latency_calls=3)
  assert not report['used'] and report.pop('index') is None
  assert 'brute force' in report['why']
  forced = ivf.choose(small, queries, _history([[]] * 64), target=0.9, n_lists=0, seed=0,
                      latency_calls=3, mode=1)
  assert forced['used'] and forced['index'] is not None


def test_the_index_survives_a_savedmodel_round_trip(tmp_path):
  vectors, centers = _clustered(1500)
  base = quantization.CandidateIndex(vectors)
  index = ivf.IvfIndex(base, *ivf.build_lists(base.vectors(), 39, seed=0), nprobe=4)

  class Holder(tf.Module):

    def __init__(self):
      super().__init__()
      self.index = index

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32),
                                  tf.TensorSpec([None, None], tf.int64)])
    def top(self, query, history):
      excluded = tf.RaggedTensor.from_tensor(history, padding=-1).to_sparse()
      ids, scores = self.index.top_k(query, excluded, tf.constant(10))
      return {'ids': ids, 'scores': scores}

  holder = Holder()
  query = tf.constant(centers[:3])
  history = tf.constant([[5, -1], [-1, -1], [7, 9]], tf.int64)
  want = holder.top(query, history)
  tf.saved_model.save(holder, str(tmp_path), signatures={'serving_default': holder.top})
  loaded = tf.saved_model.load(str(tmp_path)).signatures['serving_default']
  got = loaded(query=query, history=history)
  np.testing.assert_array_equal(got['ids'].numpy(), want['ids'].numpy())
  np.testing.assert_array_equal(got['scores'].numpy(), want['scores'].numpy())


def test_recall_measured_a_few_requests_at_a_time_is_the_same(monkeypatch):
  vectors, _ = _clustered(2000)
  queries = np.random.default_rng(5).normal(size=(30, 16)).astype(np.float32)
  base = quantization.CandidateIndex(vectors)

  def recalls():
    report = ivf.choose(base, queries, _history([[1]] * 30), target=1.0, n_lists=200,
                        seed=0, latency_calls=2, mode=1)
    return [(r['nprobe'], r['index_recall@10']) for r in report['rows']]
  whole = recalls()
  monkeypatch.setattr(ivf, 'CHUNK_VECTORS', 500)  # a request or two at a time
  assert recalls() == whole
  assert whole[-1][1] > 0.99 and whole[0][1] < 0.9


def test_overlap_counts_the_exact_ids_found():
  assert ivf.overlap([[1, 2, 3, 4]], [[4, 3, 9, 8]]).tolist() == [0.5]
  assert ivf.nprobe_ladder(10) == [1, 2, 4, 8, 10]
  assert ivf.nprobe_ladder(1) == [1]
