"""The compression search: candidates from most to least compressed, chosen on validation.

Every run tries the ladder in order and keeps the first (most compressed) candidate whose
validation Recall@10 keeps at least `target` of the trained model's, counted conservatively:
one standard error of the paired difference below the measured retention (`retention`), so
that a small validation split cannot pass a lossy candidate by luck. The test split is never
looked at: it stays for the Evaluator's gate. When no candidate reaches the target, the last
rung, the least lossy one (int8 only: no pruning, no student), is kept and the report says so.

The rungs differ in what costs quality:
- pruning (sparsity levels, halving from the configured target; fine-tuned with ranking
  distillation from the trained model),
- the distilled student query encoder (search requests; text models only),
- int8 (kept on every rung: its score error is a few thousandths).
"""

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One setting of the compression.

  Attributes:
    student: search queries through the distilled student encoder (else the trained one).
    sparsity: pruning target (0: no pruning, no fine-tuning).
    m_by_n: 2:4 structured sparsity of the dense kernels (with sparsity > 0).
    quantize: int8 tables, kernels and candidate index.
  """
  student: bool
  sparsity: float
  m_by_n: bool = False
  quantize: bool = True

  @property
  def name(self) -> str:
    parts = ['student' if self.student else 'teacher encoder']
    if self.sparsity > 0:
      parts.append(f"{'2:4 + ' if self.m_by_n else ''}{self.sparsity * 100:g}% pruned")
    else:
      parts.append('not pruned')
    parts.append('int8' if self.quantize else 'float32')
    return ', '.join(parts)

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), name=self.name)


def candidates(target_sparsity: float, m_by_n: bool, distill: bool, quantize: bool,
               search: bool, uses_text: bool) -> List[Candidate]:
  """The ladder, most compressed first.

  Args:
    target_sparsity: the most pruning tried.
    m_by_n: 2:4 structured sparsity on the pruned rungs.
    distill: whether student rungs are tried (text models only).
    quantize: int8 on every rung.
    search: False: the one candidate these settings name (no search).
    uses_text: whether the model reads text (students exist only then).
  """
  student = bool(distill and uses_text)
  first = Candidate(student, target_sparsity if target_sparsity > 0 or not m_by_n else 0.5,
                    bool(m_by_n), bool(quantize))
  if not search:
    return [first]
  levels = []
  level = first.sparsity
  # Halving: 0.5 -> 0.25 -> 0.125 is enough resolution for a few fine-tuning passes.
  while level >= 0.1:
    levels.append(round(level, 4))
    level /= 2
  ladder = [Candidate(student, s, bool(m_by_n), bool(quantize)) for s in levels]
  ladder.append(Candidate(student, 0.0, False, bool(quantize)))
  fallback = Candidate(False, 0.0, False, bool(quantize))
  if fallback not in ladder:
    ladder.append(fallback)
  return ladder


def retention(trained_ranks: np.ndarray, candidate_ranks: np.ndarray, k: int = 10,
              z: float = 1.0) -> dict:
  """Recall@k retention of a candidate on the same validation examples, with its noise.

  A paired comparison: the examples whose hit@k the candidate changed (lost or gained) are
  what the estimate's noise is made of. The standard error of (candidate hits - trained
  hits) is sqrt(changed); `lower` takes `z` of them off the candidate's hits, so that on a
  small validation split a candidate is kept only when it changed few users' results, not
  when it was merely lucky.

  Returns:
    {'point': candidate / trained recall@k, 'lower': the same, z standard errors down,
     'lost': hits the candidate lost, 'gained': hits it gained, 'trained_hits': n}.
  """
  trained_hit = np.asarray(trained_ranks) <= k
  candidate_hit = np.asarray(candidate_ranks) <= k
  if trained_hit.shape != candidate_hit.shape:
    raise ValueError('the candidate was ranked on other examples than the trained model')
  hits, kept = int(trained_hit.sum()), int(candidate_hit.sum())
  lost = int((trained_hit & ~candidate_hit).sum())
  gained = int((candidate_hit & ~trained_hit).sum())
  if not hits:
    # Nothing to keep: no evidence either way; only an unchanged candidate passes.
    point = 1.0
    lower = 1.0 if not (lost or gained) else 0.0
  else:
    point = kept / hits
    lower = (kept - z * np.sqrt(lost + gained)) / hits
  return {'point': float(point), 'lower': float(lower), 'lost': lost, 'gained': gained,
          'trained_hits': hits}


def choose(results: Sequence[dict], target: float,
           single_is_search: bool = True) -> Tuple[int, str]:
  """Index of the candidate to keep among `results` (in ladder order) and why.

  Each result has `name`, `retention` (validation Recall@10, candidate / trained) and
  `retention_lower` (the same, one standard error down: what is compared with `target`).
  single_is_search: False when the one result is the fixed settings of `search=0`.
  """
  def described(r):
    return (f"{r['name']} {r['retention']:.1%} (lower {r['retention_lower']:.1%}, "
            f"{r['lost']} hits lost, {r['gained']} gained)")

  for i, result in enumerate(results):
    if result['retention_lower'] >= target:
      why = (f"the most compressed candidate whose validation recall@10 keeps at least "
             f"{target:.1%} of the trained model's: {described(result)}")
      if i:
        why += '; more compressed ones did not: ' + ', '.join(described(r)
                                                              for r in results[:i])
      return i, why
  last = len(results) - 1
  if len(results) == 1 and not single_is_search:
    return 0, f'search=0: the settings given, not checked: {described(results[0])}'
  return last, (f"no candidate kept {target:.1%} of the trained model's validation recall@10 "
                f"(best lower bound {max(r['retention_lower'] for r in results):.1%}): fell "
                f"back to the least lossy one, {described(results[last])}")
