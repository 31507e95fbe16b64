"""Evaluation: zero-shot AUC/accuracy with bootstrap intervals, and report metrics."""
