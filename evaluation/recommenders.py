"""The classic recommenders of the baselines (evaluation/baselines.py), and their catalog.

The conventions every model shares are kept here: `Catalog` (the items a model ranks, in
tie-break order: fit interaction count descending, then item id), `history_matrix` (the users'
fit items, also their exclusions) and `Recommender` (fit on (user, item) pairs, score the catalog
for known users; unseen users get the catalog order). The models: `Popularity`, `ItemKNN`,
`ALS` (implicit), `Hybrid` (ALS blended with TF-IDF text, cold items through their text) and
`BM25` (lexical search over the item texts, scored from the query alone). Ranking, tuning and
the run over the split are in evaluation/baselines.py.
"""

import collections
import copy
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse

from contract import protocol

Pairs = List[Tuple[str, str]]

SEED = 0


class Catalog:
  """The items a model ranks, in tie-break order: fit interaction count (desc), then item id.

  Attributes:
    items: Item ids in that order; an item's position is its column in every score matrix.
    index: item id -> position.
    counts: Interaction count of each item in the fit data (0 for text-only items).
  """

  def __init__(self, fit: Pairs, extra_items: Iterable[str] = ()):
    """Builds the catalog of the items in `fit`, plus `extra_items` (e.g. the items file)."""
    counts = collections.Counter(item for _, item in fit)
    self.items = sorted(set(counts) | set(extra_items), key=lambda i: (-counts[i], i))
    self.index = {item: j for j, item in enumerate(self.items)}
    self.counts = np.array([counts[i] for i in self.items], np.float32)

  def __len__(self) -> int:
    return len(self.items)

  def positions(self, items: Sequence[str]) -> np.ndarray:
    """Catalog positions of `items`, -1 for items outside the catalog."""
    return np.array([self.index.get(item, -1) for item in items], np.int64)


def history_matrix(pairs: Pairs, users: Sequence[str], catalog: Catalog) -> sparse.csr_matrix:
  """Binary users x catalog matrix of `pairs` (items outside the catalog are left out)."""
  row_of = {user: r for r, user in enumerate(users)}
  rows, cols = [], []
  for user, item in pairs:
    r, c = row_of.get(user), catalog.index.get(item)
    if r is not None and c is not None:
      rows.append(r)
      cols.append(c)
  matrix = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                             shape=(len(users), len(catalog)))
  matrix.sum_duplicates()
  matrix.data[:] = 1.0
  return matrix

class Recommender:
  """A baseline fit on (user, item) pairs that scores its catalog for known users.

  Subclasses set `catalog` and implement `_fit` and `_scores`; users unseen in the fit data get
  all-zero scores, that is the catalog order (popularity).
  """

  catalog: Catalog

  def fit(self, pairs: Pairs) -> 'Recommender':
    """Fits on `pairs`: the users' fit items are their history and their exclusions."""
    self.users = sorted({user for user, _ in pairs})
    self.user_row = {user: r for r, user in enumerate(self.users)}
    self.catalog = self._catalog(pairs)
    self.history = history_matrix(pairs, self.users, self.catalog)
    self._fit(pairs)
    return self

  def _catalog(self, pairs: Pairs) -> Catalog:
    return Catalog(pairs)

  def _fit(self, pairs: Pairs) -> None:
    del pairs  # the history matrix is all most baselines need

  def _scores(self, rows: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def scores(self, users: Sequence[str]) -> np.ndarray:
    """[len(users), catalog] float scores; higher is better."""
    rows = np.array([self.user_row.get(user, -1) for user in users], np.int64)
    result = np.zeros((len(users), len(self.catalog)), np.float32)
    known = rows >= 0
    if known.any():
      result[known] = self._scores(rows[known])
    return result

  def exclusions(self, users: Sequence[str]) -> sparse.csr_matrix:
    """[len(users), catalog] matrix of each user's fit items."""
    rows = np.array([self.user_row.get(user, -1) for user in users], np.int64)
    known = sparse.diags((rows >= 0).astype(np.float32))
    return (known @ self.history[np.maximum(rows, 0)]).tocsr()


class Popularity(Recommender):
  """Items ordered by interaction count in the fit data (ties: item id)."""

  def _scores(self, rows: np.ndarray) -> np.ndarray:
    return np.broadcast_to(self.catalog.counts, (len(rows), len(self.catalog)))


class ItemKNN(Recommender):
  """Item-item cosine on the binary user x item matrix, with shrinkage and top-k neighbours.

  sim(i, j) = |U_i & U_j| / (sqrt(|U_i|) sqrt(|U_j|) + shrink), sim(i, i) = 0; each item keeps
  its `neighbours` most similar items (0: all); score(u, j) = sum over the user's items i of
  sim(i, j) when j is one of i's neighbours.
  """

  def __init__(self, neighbours: int = 100, shrink: float = 0.0):
    self.neighbours = neighbours
    self.shrink = shrink

  def _fit(self, pairs: Pairs) -> None:
    del pairs
    x = self.history
    co = (x.T @ x).toarray()
    norms = np.sqrt(np.diag(co))
    denominator = norms[:, None] * norms[None, :] + self.shrink
    self.cosine = np.divide(co, denominator, out=np.zeros_like(co), where=denominator > 0)
    np.fill_diagonal(self.cosine, 0.0)
    self.similarity = self._neighbourhood(self.neighbours)

  def _neighbourhood(self, k: int) -> sparse.csr_matrix:
    sim = self.cosine
    if 0 < k < sim.shape[1]:
      # argpartition on the negated rows keeps each row's k largest (deterministically).
      keep = np.argpartition(-sim, k - 1, axis=1)[:, :k].ravel()
      rows = np.repeat(np.arange(sim.shape[0]), k)
      similarity = sparse.csr_matrix((sim[rows, keep], (rows, keep)), shape=sim.shape)
    else:
      similarity = sparse.csr_matrix(sim)
    similarity.eliminate_zeros()
    return similarity

  def with_neighbours(self, neighbours: int) -> 'ItemKNN':
    """The same fitted similarities cut to another neighbourhood size (tuning needs no refit)."""
    other = copy.copy(self)
    other.neighbours = neighbours
    other.similarity = self._neighbourhood(neighbours)
    return other

  def _scores(self, rows: np.ndarray) -> np.ndarray:
    return (self.history[rows] @ self.similarity).toarray()


def _blas_single_thread():
  # implicit's ALS runs its own threads; a multi-threaded OpenBLAS inside them is much slower
  # (implicit warns about it), so BLAS is held to one thread while it fits.
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  return threadpoolctl.threadpool_limits(1, 'blas')


class ALS(Recommender):
  """implicit's AlternatingLeastSquares on CPU, seeded; score = user factors . item factors.

  Confidence is `alpha` on each observed (binary) pair, as implicit 0.7 defines it.
  """

  def __init__(self, factors: int = 64, regularization: float = 0.1, alpha: float = 1.0,
               iterations: int = 15, seed: int = SEED):
    self.factors = factors
    self.regularization = regularization
    self.alpha = alpha
    self.iterations = iterations
    self.seed = seed

  def _fit(self, pairs: Pairs) -> None:
    del pairs
    from implicit.cpu import als  # pylint: disable=g-import-not-at-top
    with _blas_single_thread():
      model = als.AlternatingLeastSquares(
          factors=self.factors, regularization=self.regularization, alpha=self.alpha,
          iterations=self.iterations, random_state=self.seed)
      model.fit(self.history, show_progress=False)
    self.user_factors = np.asarray(model.user_factors, np.float32)
    self.item_factors = np.asarray(model.item_factors, np.float32)

  def _scores(self, rows: np.ndarray) -> np.ndarray:
    return self.user_factors[rows] @ self.item_factors.T


class TextIndex:
  """Word vectors of item texts over a catalog, with protocol.title_words as the tokenizer."""

  def __init__(self, catalog: Catalog, texts: Dict[str, str]):
    self.vocabulary: Dict[str, int] = {}
    rows, cols, values = [], [], []
    for row, item in enumerate(catalog.items):
      for word, count in collections.Counter(protocol.title_words(texts.get(item, ''))).items():
        rows.append(row)
        cols.append(self.vocabulary.setdefault(word, len(self.vocabulary)))
        values.append(count)
    self.counts = sparse.csr_matrix((np.array(values, np.float32), (rows, cols)),
                                    shape=(len(catalog), len(self.vocabulary)))
    self.documents = len(catalog)
    self.document_frequency = np.asarray((self.counts > 0).sum(axis=0), np.float32).ravel()

  def query_counts(self, queries: Sequence[str]) -> sparse.csr_matrix:
    """[queries, vocabulary] word counts (words outside the vocabulary are dropped)."""
    rows, cols, values = [], [], []
    for row, query in enumerate(queries):
      for word, count in collections.Counter(protocol.title_words(query)).items():
        if word in self.vocabulary:
          rows.append(row)
          cols.append(self.vocabulary[word])
          values.append(count)
    return sparse.csr_matrix((np.array(values, np.float32), (rows, cols)),
                             shape=(len(queries), len(self.vocabulary)))


def _l2_normalize_rows(matrix: sparse.csr_matrix) -> sparse.csr_matrix:
  norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
  return sparse.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0)) @ matrix


class TfIdf:
  """L2-normalized TF-IDF item vectors (sublinear tf, smoothed idf) and cosine scoring."""

  def __init__(self, index: TextIndex):
    self.index = index
    self.idf = (np.log((1.0 + index.documents) / (1.0 + index.document_frequency)) + 1.0
                ).astype(np.float32)
    self.items = self._weigh(index.counts)

  def _weigh(self, counts: sparse.csr_matrix) -> sparse.csr_matrix:
    weighted = counts.copy()
    weighted.data = 1.0 + np.log(weighted.data)
    return _l2_normalize_rows(weighted @ sparse.diags(self.idf)).tocsr()

  def query_scores(self, queries: Sequence[str]) -> np.ndarray:
    """Cosine between each query's TF-IDF vector and every item: [queries, catalog]."""
    return (self._weigh(self.index.query_counts(queries)) @ self.items.T).toarray()

  def profile_scores(self, history: sparse.csr_matrix) -> np.ndarray:
    """Cosine between each user's profile (sum of history item vectors) and every item."""
    profiles = _l2_normalize_rows((history @ self.items).tocsr())
    return (profiles @ self.items.T).toarray()


class Hybrid(Recommender):
  """ALS blended with a text content score; ranks every item of the items file too.

  score(u, j) = (1 - text_weight) * x_u . y_j + text_weight * cos(profile(u), tfidf(j)), where
  x, y are ALS factors and profile(u) sums the TF-IDF vectors of the user's fit items. An item
  without interactions has no ALS factor of its own: y_j is then the mean of the factors of its
  TEXT_NEIGHBOURS most similar items by title (weighted by TF-IDF cosine), as LightFM builds an
  item from its features' embeddings. So cold items are retrievable through their text. This
  stands in for LightFM with item features, which does not build here.
  """

  TEXT_NEIGHBOURS = 20

  def __init__(self, texts: Dict[str, str], text_weight: float = 0.3,
               als: Optional[ALS] = None, **als_params):
    """Sets up the hybrid.

    Args:
      texts: item id -> text (`item_texts`); its items join the catalog.
      text_weight: Blend weight of the content score, in [0, 1].
      als: An ALS already fit on the pairs this hybrid will be fit on (saves refitting it).
      **als_params: Hyperparameters of the ALS part (see `ALS`), when `als` is not given.
    """
    self.texts = texts
    self.text_weight = text_weight
    self.fitted_als = als
    self.als_params = als_params

  def _catalog(self, pairs: Pairs) -> Catalog:
    return Catalog(pairs, self.texts)

  def _fit(self, pairs: Pairs) -> None:
    als = self.fitted_als or ALS(**self.als_params).fit(pairs)
    if als.users != self.users or set(als.catalog.items) != {item for _, item in pairs}:
      raise ValueError('the given ALS was fit on other pairs than the hybrid')
    self.tfidf = TfIdf(TextIndex(self.catalog, self.texts))
    warm = self.catalog.positions(als.catalog.items)
    cold = np.setdiff1d(np.arange(len(self.catalog)), warm)
    self.user_factors = als.user_factors
    self.item_factors = np.zeros((len(self.catalog), als.item_factors.shape[1]), np.float32)
    self.item_factors[warm] = als.item_factors
    if len(cold) and len(warm):
      similarity = (self.tfidf.items[cold] @ self.tfidf.items[warm].T).toarray()
      k = min(self.TEXT_NEIGHBOURS, len(warm))
      weights = np.zeros_like(similarity)
      nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
      np.put_along_axis(weights, nearest, np.take_along_axis(similarity, nearest, 1), axis=1)
      total = weights.sum(axis=1, keepdims=True)
      weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
      self.item_factors[cold] = weights @ als.item_factors

  def with_weight(self, text_weight: float) -> 'Hybrid':
    """The same fitted model with another blend weight (tuning it needs no refit)."""
    other = copy.copy(self)
    other.text_weight = text_weight
    return other

  def _scores(self, rows: np.ndarray) -> np.ndarray:
    collaborative = self.user_factors[rows] @ self.item_factors.T
    content = self.tfidf.profile_scores(self.history[rows])
    return (1.0 - self.text_weight) * collaborative + self.text_weight * content

  def query_scores(self, queries: Sequence[str]) -> np.ndarray:
    """Search: TF-IDF cosine of the query alone (no user)."""
    return self.tfidf.query_scores(queries)


class BM25:
  """Lexical search: Okapi BM25 over item title, description, category and brand.

  Its catalog is every item of the items file plus the fit items (tie-break: fit popularity,
  then item id); it scores from the query alone.
  """

  def __init__(self, texts: Dict[str, str], k1: float = 1.2, b: float = 0.75):
    self.texts = texts
    self.k1 = k1
    self.b = b

  def fit(self, pairs: Pairs) -> 'BM25':
    self.catalog = Catalog(pairs, self.texts)
    self.index = TextIndex(self.catalog, self.texts)
    counts = self.index.counts.tocoo()
    lengths = np.asarray(self.index.counts.sum(axis=1), np.float32).ravel()
    average = lengths.mean() if len(lengths) and lengths.mean() > 0 else 1.0
    df = self.index.document_frequency
    idf = np.log(1.0 + (self.index.documents - df + 0.5) / (df + 0.5))
    tf = counts.data
    norm = self.k1 * (1.0 - self.b + self.b * lengths[counts.row] / average)
    weights = idf[counts.col] * tf * (self.k1 + 1.0) / (tf + norm)
    self.weights = sparse.csr_matrix((weights.astype(np.float32), (counts.row, counts.col)),
                                     shape=counts.shape)
    return self

  def query_scores(self, queries: Sequence[str]) -> np.ndarray:
    """[queries, catalog] BM25 scores (query word counts times the item term weights)."""
    return (self.index.query_counts(queries) @ self.weights.T).toarray()
