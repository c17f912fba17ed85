"""Workflows built from the engine and the operator library (above both layers)."""
