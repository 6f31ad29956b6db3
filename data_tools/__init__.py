"""One-shot, idempotent dataset preparation: the built-in dataset, converters and a validator."""
