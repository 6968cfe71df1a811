"""The object store: `file:///path` or `s3://bucket/prefix`, one interface over pyarrow.fs.

S3-compatible servers (MinIO, moto) are reached through `endpoint_url` or AWS_ENDPOINT_URL;
credentials come from the usual AWS environment variables, never from config files here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass
class ObjectStore:
    fs: pafs.FileSystem
    root: str  # path inside `fs`, no trailing slash
    url: str

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> "ObjectStore":
        parsed = urlparse(url)
        if parsed.scheme == "file":
            root = parsed.path.rstrip("/") or "/"
            os.makedirs(root, exist_ok=True)
            return cls(pafs.LocalFileSystem(), root, url)
        if parsed.scheme == "s3":
            endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            options = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
            if endpoint_url:
                endpoint = urlparse(endpoint_url)
                options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme or "https")
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if key and secret:
                options.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
            root = f"{parsed.netloc}{parsed.path}".rstrip("/")
            return cls(pafs.S3FileSystem(**options), root, url)
        raise ValueError(f"object store URL must be file:// or s3://, got {url!r}")

    def path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid object key {key!r}")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the whole object or nothing."""
        with self.open_output(key) as out:
            out.write(data)

    def open_input(self, key: str):
        """A random-access file (ranged reads on S3): Parquet readers fetch only what they need."""
        return self.fs.open_input_file(self.path(key))

    @contextlib.contextmanager
    def open_output(self, key: str):
        """A stream to write an object without holding it in memory. Atomic: a local file is
        written aside and renamed; an S3 object appears when its upload completes (and a failed
        one is removed, since closing the stream completes the upload even on error)."""
        target = self.path(key)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open_output_stream(tmp) as out:
                    yield out
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            try:
                with self.fs.open_output_stream(target) as out:
                    yield out
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(target)
                raise

    def get_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(self.path(key)) as src:
            return src.read()

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder), sorted; temporary files are skipped."""
        selector = pafs.FileSelector(self.path(prefix.rstrip("/")), recursive=True, allow_not_found=True)
        keys = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and ".tmp-" not in info.base_name:
                keys.append(info.path[len(self.root) + 1 :])
        return sorted(keys)

    def sizes(self, prefix: str) -> dict[str, int]:
        """{key: bytes} of the files under `prefix` (a folder), temporary files skipped."""
        selector = pafs.FileSelector(self.path(prefix.rstrip("/")), recursive=True, allow_not_found=True)
        return {
            info.path[len(self.root) + 1 :]: info.size or 0
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and ".tmp-" not in info.base_name
        }

    def size(self, prefix: str) -> int:
        selector = pafs.FileSelector(self.path(prefix.rstrip("/")), recursive=True, allow_not_found=True)
        return sum(i.size or 0 for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def size_of(self, key: str) -> int:
        return self.fs.get_file_info(self.path(key)).size

    def delete(self, key: str, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:
            if not missing_ok:
                raise
