"""The evaluation side: classic baselines, the run summary and the run report, read from ML
Metadata and the artifacts (docs/contracts.md §3)."""
