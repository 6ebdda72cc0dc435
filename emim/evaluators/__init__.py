"""Evaluators that run inside training at their own cadence (and in the eval program)."""
