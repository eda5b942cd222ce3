"""The data contract (docs/contracts.md §1) and the evaluation protocol (§2): plain Python, no
TensorFlow, so that every Beam worker and every reader runs the same checks and the same split."""
