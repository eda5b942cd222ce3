"""GET /metrics of the real-time service, with prometheus_client: the /stats counters, the
stream's and the store's state, and a histogram of /recommend latencies (docs/realtime.md)."""

from typing import Any, Callable, Dict

import prometheus_client
from prometheus_client import core


class ServiceMetrics:
  """A registry of one service: its /stats snapshot at each scrape, and the latency histogram."""

  def __init__(self, stats: Callable[[], Dict[str, Any]]):
    self._stats = stats
    self.registry = prometheus_client.CollectorRegistry()
    self.registry.register(self)
    self.recommend_latency = prometheus_client.Histogram(
        'realtime_recommend_latency_seconds', 'GET /recommend, answered (any status).',
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
        registry=self.registry)

  def exposition(self) -> str:
    """The metrics in Prometheus' text format."""
    return prometheus_client.generate_latest(self.registry).decode()

  def collect(self):
    """prometheus_client's collector interface: /stats as metric families."""
    stats = self._stats()
    by_field = core.CounterMetricFamily(
        'realtime_events_malformed_by_field', 'Malformed events by the field at fault.',
        labels=['field'])
    for name, value in sorted(stats['counters'].items()):
      if name.startswith('malformed_field:'):
        by_field.add_metric([name.split(':', 1)[1]], value)
      else:
        yield core.CounterMetricFamily(f'realtime_{name}', name, value=value)
    yield by_field
    for name, value in sorted(stats.get('stream', {}).items()):
      if isinstance(value, (bool, int)):
        yield core.GaugeMetricFamily(f'realtime_stream_{name}', name, value=int(value))
    if 'redis_up' in stats:
      yield core.GaugeMetricFamily('realtime_redis_up', 'Redis answers PING.',
                                   value=int(stats['redis_up']))
    yield core.GaugeMetricFamily('realtime_cache_entries', 'Cached recommendations.',
                                 value=stats['cache_entries'])
