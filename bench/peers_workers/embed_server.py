"""A local OpenAI-compatible `/v1/embeddings` for the peers (runs on the product's venv).

`lookup TEXTS.json VECTORS.npy`: answers the shared precomputed vectors by text (the test
suite's fault server, vector_platform_tests/fault_server.py, with no faults); a text it
does not know is a 500 naming it, never a made-up vector. `model`: the live local model
(all-MiniLM-L6-v2 through the platform's `LocalEmbedder`, the same settings as our ingest:
max 256 tokens, 32 texts per forward pass), one request's inputs encoded together.

pgai's vectorizer worker can only embed through such an endpoint; the LlamaIndex and
LangChain workers use it in the live run, so their venv needs no torch. Prints
`PORT <port>` once serving, and serves until killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

import jobkit  # noqa: E402
from vector_platform_tests.fault_server import FaultServer  # noqa: E402


class LookupServer(FaultServer):
    def __init__(self, texts_path: str, vectors_path: str):
        super().__init__(dims=384)
        self.lookup = jobkit.Lookup(texts_path, vectors_path)

    def _answer(self, inputs, count=True, encoding="float") -> Response:
        try:
            vectors = self.lookup(inputs)
        except KeyError as err:
            return JSONResponse({"error": {"message": str(err)}}, status_code=500)
        return Response(self._payload(list(vectors), encoding), media_type="application/json")


class ModelServer(FaultServer):
    def __init__(self):
        super().__init__(dims=384)
        from vector_platform.ingest.embedders import LocalEmbedder
        from vector_platform.models import MINILM

        self.embedder = LocalEmbedder(MINILM)
        self.embedder._model()  # loaded before the first request, not during a peer's run

    def _answer(self, inputs, count=True, encoding="float") -> Response:
        vectors = np.asarray(self.embedder.embed(inputs), np.float32)
        return Response(self._payload(list(vectors), encoding), media_type="application/json")


def main() -> None:
    server = LookupServer(sys.argv[2], sys.argv[3]) if sys.argv[1] == "lookup" else ModelServer()
    server.start()
    print(f"PORT {server.port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
