"""Prometheus metrics of the local model server, with prometheus_client.

tensorflow_model_server exports, with `--monitoring_config_file` (prometheus_config { enable:
true path: ... }), request counts by model and status and request latencies on its REST port.
The local server exports the same two on the same path (serving_config/monitoring.config):

- `:tensorflow:serving:request_count_total{model_name, status}`: Predict calls (gRPC and REST)
  by the status they were answered with (OK, INVALID_ARGUMENT, NOT_FOUND, ...);
- `:tensorflow:serving:request_latency{model_name, API, entrypoint}`: a histogram of their
  latency in microseconds (API "predict", entrypoint the signature).

prometheus_client names a counter `<name>_total`, where TF Serving writes `<name>`. Only models
the server serves get their own label: other names count as "<unknown>", so a client sending
random model names cannot grow the label set (docs/security.md).
"""

from typing import Iterable

import prometheus_client

UNKNOWN_MODEL = '<unknown>'
# Microseconds, as TF Serving's request_latency: 100 us to 10 s.
LATENCY_BUCKETS_US = (100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
                      250_000, 500_000, 1_000_000, 2_500_000, 10_000_000)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class ServerMetrics:
  """Request counts and latencies of one server, in a registry of its own."""

  def __init__(self, path: str, models: Iterable[str]):
    self.path = path
    self._models = frozenset(models)
    self.registry = prometheus_client.CollectorRegistry()
    self._requests = prometheus_client.Counter(
        ':tensorflow:serving:request_count', 'Predict calls by model and answer status.',
        ['model_name', 'status'], registry=self.registry)
    self._latency = prometheus_client.Histogram(
        ':tensorflow:serving:request_latency', 'Predict latency in microseconds.',
        ['model_name', 'API', 'entrypoint'], buckets=LATENCY_BUCKETS_US,
        registry=self.registry)

  def observe(self, model_name: str, signature: str, status: str, seconds: float) -> None:
    """Counts one Predict call answered with `status` after `seconds`."""
    model = model_name if model_name in self._models else UNKNOWN_MODEL
    self._requests.labels(model_name=model, status=status).inc()
    if model != UNKNOWN_MODEL:
      self._latency.labels(model_name=model, API='predict', entrypoint=signature).observe(
          seconds * 1e6)

  def exposition(self) -> bytes:
    """The metrics in Prometheus' text format."""
    return prometheus_client.generate_latest(self.registry)
