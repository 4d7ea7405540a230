"""AETR's peers measured in the same run (`benchmarks/run --peers`): Celery + Redis, in a venv of their own."""
