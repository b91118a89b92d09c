"""Prefect deployment entry points."""
