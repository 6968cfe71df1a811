"""The soak's servers, each in a process of its own (so that their work does not share the
test process's interpreter with the worker thread that runs the moves):

    python -m vector_platform_tests.reliability.soak_serve api DSN STORE_URL PORT
    python -m vector_platform_tests.reliability.soak_serve model

`api`: the HTTP search API as `vector-platform serve` runs it (the same
`vector_platform.http.serve`: Starlette under uvicorn on 127.0.0.1), on the tests' fake
embedder for the built-in model, so that queries are embedded as the soak's documents were;
OpenAI-compatible models go to their server over HTTP.

`model`: the second model, the OpenAI-compatible test server (`fault_server`, no faults set)
answering MiniLM's vectors (`upgrade_data.server`); prints its base URL on the first line of
stdout and serves until terminated.
"""

import os
import signal
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def api(dsn: str, store_url: str, port: int) -> int:
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


def model() -> int:
    from vector_platform_tests import upgrade_data

    server = upgrade_data.server()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(server.base_url, flush=True)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    role = sys.argv[1]
    sys.exit(api(sys.argv[2], sys.argv[3], int(sys.argv[4])) if role == "api" else model())
