"""Where backups live: one small object-store API over a directory or an S3 bucket.

`Target` is the whole API the backup engine uses: put, get (raises `NotFound`), exists,
list(prefix), delete. Keys are relative, `/`-separated (`blocks/ab/ab12...`,
`backups/<id>.json`). Two implementations:

- `FileTarget` (`file:///PATH`): a directory, e.g. an NFS mount. A put writes a temporary
  file beside the final one, fsyncs it, renames it over the key and fsyncs the directory, so
  a reader sees the whole old object or the whole new one, and a put that returned survives
  a crash. Blocking file I/O runs in threads.
- `S3Target` (`s3://BUCKET/PREFIX`): any S3-compatible store through obstore (measured here
  against aiobotocore: docs/BACKUPS.md). Endpoint and credentials come from the standard
  variables `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`,
  default us-east-1). With an explicit endpoint, requests are path-style (`/BUCKET/KEY`),
  which S3-compatible servers expect.

`parse_target(url)` makes one from a URL, with a one-line error for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from abc import ABC, abstractmethod
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from pxcluster.backup.errors import InvalidTarget, NotFound, TargetError

_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_TMP_MARK = ".tmp-"
# Every request is bounded: a dead endpoint fails the backup instead of hanging it.
REQUEST_TIMEOUT = "60s"
CONNECT_TIMEOUT = "10s"
RETRY_TIMEOUT = timedelta(seconds=60)


def check_key(key: str) -> str:
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class Target(ABC):
    """An object store holding backups. Use as an async context manager (or call close)."""

    url: str

    @abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any object there; atomic for readers."""

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """The object's bytes; raises NotFound if there is none."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Every key starting with `prefix` (a string prefix, as S3's), sorted."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; a key that does not exist is not an error."""

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Target:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __str__(self) -> str:
        return self.url


class FileTarget(Target):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _fail(self, op: str, key: str, e: OSError) -> TargetError:
        return TargetError(f"{self.url}: {op} {key}: {e.strerror or e}")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise InvalidTarget(f"{self.url}: no such directory {self.root}")

    def _put_sync(self, key: str, data: bytes) -> None:
        self._check_root()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{_TMP_MARK}{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        # The rename is durable only once the directory is.
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._put_sync, key, data)
        except OSError as e:
            raise self._fail("put", key, e) from None

    def _get_sync(self, key: str) -> bytes:
        self._check_root()
        return self._path(key).read_bytes()

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._get_sync, key)
        except FileNotFoundError:
            raise NotFound(self.url, key) from None
        except OSError as e:
            raise self._fail("get", key, e) from None

    async def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.is_file)
        except OSError as e:
            raise self._fail("stat", key, e) from None

    def _list_sync(self, prefix: str) -> list[str]:
        self._check_root()
        # Walk only the directory the prefix names, then filter by the string prefix.
        base, _, _ = prefix.rpartition("/")
        start = self.root / base if base else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:
                    continue  # a put in progress, or one a crash left behind
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def list(self, prefix: str) -> list[str]:
        try:
            return await asyncio.to_thread(self._list_sync, prefix)
        except OSError as e:
            raise self._fail("list", prefix, e) from None

    def _delete_sync(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._delete_sync, key)
        except OSError as e:
            raise self._fail("delete", key, e) from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text.split(" Debug source:")[0]  # obstore appends the Rust error's Debug form
    return text if len(text) <= 300 else text[:297] + "..."


class S3Target(Target):
    def __init__(self, bucket: str, prefix: str, env: dict[str, str] | None = None) -> None:
        from obstore.store import S3Store

        env = dict(os.environ if env is None else env)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        config: dict[str, Any] = {"region": region}
        if endpoint:
            if not endpoint.startswith(("http://", "https://")):
                raise InvalidTarget(f"AWS_ENDPOINT_URL {endpoint!r} is not an http(s) URL")
            config["endpoint"] = endpoint.rstrip("/")
            config["virtual_hosted_style_request"] = False
        if bool(env.get("AWS_ACCESS_KEY_ID")) != bool(env.get("AWS_SECRET_ACCESS_KEY")):
            raise InvalidTarget(
                f"{self.url}: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither"
            )
        for var, name in (
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
        ):
            if env.get(var):
                config[name] = env[var]
        try:
            self._store = S3Store(
                bucket,
                prefix=prefix or None,
                config=config,  # type: ignore[arg-type]
                client_options={
                    "allow_http": endpoint.startswith("http://"),
                    "timeout": REQUEST_TIMEOUT,
                    "connect_timeout": CONNECT_TIMEOUT,
                },
                retry_config={"max_retries": 3, "retry_timeout": RETRY_TIMEOUT},
            )
        except Exception as e:
            raise InvalidTarget(f"{self.url}: {_one_line(e)}") from None

    def _fail(self, op: str, key: str, e: BaseException) -> TargetError:
        return TargetError(f"{self.url}: {op} {key}: {_one_line(e)}")

    @staticmethod
    def _is_not_found(e: BaseException) -> bool:
        from obstore.exceptions import NotFoundError

        return isinstance(e, NotFoundError | FileNotFoundError)

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            await obstore.put_async(self._store, check_key(key), data, use_multipart=False)
        except Exception as e:
            raise self._fail("put", key, e) from None

    async def get(self, key: str) -> bytes:
        import obstore

        try:
            result = await obstore.get_async(self._store, check_key(key))
            return bytes(await result.bytes_async())
        except Exception as e:
            if self._is_not_found(e):
                raise NotFound(self.url, key) from None
            raise self._fail("get", key, e) from None

    async def exists(self, key: str) -> bool:
        import obstore

        try:
            await obstore.head_async(self._store, check_key(key))
            return True
        except Exception as e:
            if self._is_not_found(e):
                return False
            raise self._fail("head", key, e) from None

    async def list(self, prefix: str) -> list[str]:
        import obstore

        keys: list[str] = []
        try:
            # obstore lists by path segments; the string prefix is applied here.
            base, _, _ = prefix.rpartition("/")
            async for page in obstore.list(self._store, base or None, chunk_size=1000):
                keys.extend(m["path"] for m in page if m["path"].startswith(prefix))
        except Exception as e:
            if self._is_not_found(e):
                return []
            raise self._fail("list", prefix, e) from None
        return sorted(keys)

    async def delete(self, key: str) -> None:
        import obstore

        try:
            await obstore.delete_async(self._store, check_key(key))
        except Exception as e:
            if self._is_not_found(e):
                return
            raise self._fail("delete", key, e) from None


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_target(url: str, env: dict[str, str] | None = None) -> Target:
    """`file:///PATH` or `s3://BUCKET[/PREFIX]`; InvalidTarget with the reason otherwise."""
    text = url.strip()
    if not text:
        raise InvalidTarget("empty backup target: give file:///PATH or s3://BUCKET/PREFIX")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidTarget(
                f"backup target {url!r}: a file URL has no host; write file:///ABSOLUTE/PATH"
            )
        if parts.query or parts.fragment:
            raise InvalidTarget(f"backup target {url!r}: no query or fragment allowed")
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise InvalidTarget(f"backup target {url!r}: file URLs need an absolute directory")
        return FileTarget(Path(os.path.normpath(path)))
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise InvalidTarget(f"backup target {url!r}: no bucket; write s3://BUCKET/PREFIX")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise InvalidTarget(
                f"backup target {url!r}: {bucket!r} is not a valid bucket name "
                "(3-63 lower-case letters, digits, dots, hyphens)"
            )
        if parts.query or parts.fragment:
            raise InvalidTarget(f"backup target {url!r}: no query or fragment allowed")
        prefix = unquote(parts.path).strip("/")
        if prefix and not _KEY.match(prefix):
            raise InvalidTarget(
                f"backup target {url!r}: prefix {prefix!r} may hold only letters, digits, "
                "'.', '_', '-' and '/'"
            )
        if any(p in (".", "..") for p in prefix.split("/")):
            raise InvalidTarget(f"backup target {url!r}: '.' and '..' are not allowed in a prefix")
        return S3Target(bucket, prefix, env)
    if not scheme or "://" not in text:
        raise InvalidTarget(
            f"backup target {url!r} is not a URL: give file:///PATH or s3://BUCKET/PREFIX"
        )
    raise InvalidTarget(
        f"backup target {url!r}: unsupported scheme {scheme!r} (use file:// or s3://)"
    )
