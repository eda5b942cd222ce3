"""Progress lines of long compression work: what runs, step x/y, loss, elapsed, time left.

The estimate of the time left is printed, never obeyed: every budget is in steps, so that a
run's result does not depend on how busy the machine is.
"""

import sys
import time
from typing import Optional


def _duration(seconds: float) -> str:
  seconds = max(0.0, seconds)
  if seconds < 90:
    return f'{seconds:.0f} s'
  return f'{seconds / 60:.1f} min'


def say(text: str) -> None:
  """One progress line on stdout, prefixed like the pipeline's own component lines."""
  print(f'[Compressor] {text}', file=sys.stdout, flush=True)


class Progress:
  """Prints `[Compressor] <what>: step x/y, loss l, elapsed e, about r left` about `lines`
  times over `total` steps (and at the last step)."""

  def __init__(self, what: str, total: int, lines: int = 5):
    self.what = what
    self.total = max(1, int(total))
    self.every = max(1, -(-self.total // max(1, lines)))
    self.started = time.time()
    say(f'{what}: {self.total} steps')

  def step(self, done: int, loss: Optional[float] = None) -> None:
    if done % self.every and done != self.total:
      return
    elapsed = time.time() - self.started
    left = elapsed / done * (self.total - done) if done else 0.0
    loss_text = '' if loss is None else f', loss {loss:.4f}'
    say(f'{self.what}: step {done}/{self.total}{loss_text}, {_duration(elapsed)} elapsed, '
        f'about {_duration(left)} left')
