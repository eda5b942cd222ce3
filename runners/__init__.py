"""How a pipeline is run and cached: Beam runner presets and the code part of cache keys (the
DAG itself is pipeline.py's create_pipeline)."""
