"""Dagster definitions, autoloaded by `load_from_defs_folder` (see definitions.py)."""
