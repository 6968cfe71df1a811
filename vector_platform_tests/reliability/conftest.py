"""The reliability suite (issue 11): faults injected into every component, hostile input,
least privilege and a bounded soak. Each module keeps its own fixtures; the shared ones come
from ../conftest.py. `make soak` runs the soak for 10 minutes (VP_SOAK_SECONDS=600)."""
