"""Deployment: export (export.py), loading and running an exported model (predictor.py), timing (timing.py)."""
