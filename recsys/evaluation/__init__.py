"""Offline evaluation: baselines and metrics that run on numpy alone."""
