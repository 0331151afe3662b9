"""Evaluation runs of a model on benchmark files, and plots."""
