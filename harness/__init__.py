"""The shared trainer, evaluator and entry points."""
