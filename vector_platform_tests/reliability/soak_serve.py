"""The HTTP search API in a process of its own, as `vector-platform serve` runs it (the same
`vector_platform.http.serve`: Starlette under uvicorn on 127.0.0.1), but on the tests' fake
embedder for the built-in model, so that queries are embedded as the soak's documents were.
OpenAI-compatible models still go to their (test) server over HTTP.

    python -m vector_platform_tests.reliability.soak_serve DSN STORE_URL PORT
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    dsn, store_url, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from vector_platform.api import Platform
    from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
    from vector_platform.http import serve
    from vector_platform_tests.conftest import FakeEmbedderResource

    resources = {
        "postgres": PostgresResource(dsn=dsn),
        "object_store": ObjectStoreResource(url=store_url),
        "embedder": FakeEmbedderResource(),
    }
    # Search and get never launch a run: no Dagster instance is needed (nor made).
    return serve(host="127.0.0.1", port=port, platform=Platform(resources=resources))


if __name__ == "__main__":
    sys.exit(main())
