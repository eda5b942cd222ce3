"""The names a run is recorded under: the pipeline's name and its nodes' ids.

pipeline.py builds the DAG with them; the run summary, the run report, the notebooks and the
tests read runs back from ML Metadata by them. Kept apart from pipeline.py (which imports all of
TFX) so that a reader needs nothing but this module (docs/architecture.md).
"""

PIPELINE_NAME = 'recommender'

# Component ids (role -> id), also the keys of run_summary.json's timings.
NODE_IDS = {
    'example_gen': 'SequenceExampleGen',
    'statistics_gen': 'StatisticsGen',
    'schema_gen': 'SchemaGen',
    'example_validator': 'ExampleValidator',
    'anomalies_gate': 'AnomaliesGate',
    'baselines': 'Baselines',
    'transform': 'Transform',
    'text_encoder': 'TextEncoder',
    'trainer': 'Trainer',
    'compressor': 'Compressor',
    'evaluator': 'Evaluator',
    'search_evaluator': 'SearchEvaluator',
    'baseline_gate': 'BaselineGate',
    'pusher': 'Pusher',
}
# With --tune only (not in NODE_IDS, the nodes of every run).
TUNER_ID = 'Tuner'
