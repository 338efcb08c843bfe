"""Evaluation: a procedural toy world, its text encoder and analyzers, and trained toy models."""
