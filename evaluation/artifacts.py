"""Where the project's own components write their outputs inside an artifact's directory.

One place for each file name, read by the components that write the files, by the ones
downstream and by the run summary and report, so that no reader imports a writer's module
(which would load TensorFlow models to read a JSON file). docs/contracts.md §3 describes the
files.
"""

import json
import os
from typing import Any, Dict

import tensorflow as tf

from trainers import features

# SequenceExampleGen's SplitExport: the split as CSV files (the same split the classic
# baselines and benchmarks/quality.py read), the catalog, and the counts of the data report.
SPLIT_FILES = {features.TRAIN_SPLIT: 'train.csv', features.EVAL_SPLIT: 'valid.csv',
               features.TEST_SPLIT: 'test.csv'}
SPLIT_REPORT_FILE = 'report.json'
ITEMS_FILE = 'items.csv'
# Baselines' BaselineMetrics: each classic recommender's tuned settings and metrics.
BASELINES_FILE = 'baselines.json'
# BaselineGate's blessing: the verdict and both numbers.
GATE_FILE = 'gate.json'
# Compressor's CompressionReport: every candidate tried, the one chosen and why.
COMPRESSION_REPORT_JSON = 'report.json'
COMPRESSION_REPORT_MD = 'report.md'


def _read_json(uri: str, name: str) -> Any:
  with tf.io.gfile.GFile(os.path.join(uri, name)) as f:
    return json.load(f)


def read_split_report(split_uri: str) -> Dict[str, Any]:
  """The data report of a SplitExport artifact."""
  return _read_json(split_uri, SPLIT_REPORT_FILE)


def read_baselines(uri: str) -> Dict[str, Dict[str, Any]]:
  """The classic baselines of a BaselineMetrics artifact, by name."""
  return _read_json(uri, BASELINES_FILE)


def read_gate(uri: str) -> Dict[str, Any]:
  """The BaselineGate's verdict in its blessing artifact."""
  return _read_json(uri, GATE_FILE)


def read_compression_report(report_uri: str) -> Dict[str, Any]:
  """The report.json of a CompressionReport artifact."""
  return _read_json(report_uri, COMPRESSION_REPORT_JSON)
