"""Keras models: the two-tower retrieval model and the multi-task ranker."""
