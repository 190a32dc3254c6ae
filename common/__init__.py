"""Shared toolkit for the algorithm files: tasks, environments, datasets, evaluation.

A reader of `cfcql.py` / `icql_qs.py` / `spacql_*.py` may treat everything here as a black box.
"""
