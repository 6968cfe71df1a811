"""vector_platform: the whole life of vector collections on PostgreSQL + pgvector, run by Dagster.

The Python API a user calls directly lives in `vector_platform.api`; the Dagster code
location is `vector_platform.definitions`.
"""

__version__ = "0.1.0"
