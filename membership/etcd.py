"""A thin typed layer over aetcd: one place that knows the client library.

Every call is bounded by a timeout, and every client failure becomes `EtcdUnavailable`, so a
CLI facing an unreachable etcd prints one line instead of hanging or dumping a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.rtypes
import aetcd.watcher
import grpc  # type: ignore[import-untyped]


class EtcdUnavailable(Exception):
    """etcd could not be reached or did not answer in time."""


class EtcdConfigError(EtcdUnavailable):
    """The TLS or user/password settings are unusable (missing file, half a pair, http URL
    with TLS files, refused credentials). A subclass of EtcdUnavailable so every caller that
    turns an unreachable etcd into one clear line does the same for these."""


@dataclass(frozen=True)
class EtcdSettings:
    """How to talk to etcd beyond its URL: client TLS and user/password (all optional).

    `cacert` verifies the server (system roots when empty and the URL is https), `cert` and
    `key` are this client's certificate (etcd `--client-cert-auth`), `user`/`password` an etcd
    user when etcd has `auth enable`d.
    """

    cacert: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = ""

    @property
    def tls_files(self) -> bool:
        return bool(self.cacert or self.cert or self.key)

    def check(self, url: str) -> None:
        tls = url.lower().startswith("https://")
        if self.tls_files and not tls:
            raise EtcdConfigError(
                f"--etcd-cacert/--etcd-cert/--etcd-key need an https:// etcd URL, not {url}"
            )
        if bool(self.cert) != bool(self.key):
            raise EtcdConfigError("--etcd-cert and --etcd-key go together: give both or neither")
        if bool(self.user) != bool(self.password):
            raise EtcdConfigError(
                "--etcd-user needs a password (--etcd-password-file or PXC_ETCD_PASSWORD), "
                "and a password needs --etcd-user"
            )
        for what, path in (("cacert", self.cacert), ("cert", self.cert), ("key", self.key)):
            if path and not Path(path).is_file():
                raise EtcdConfigError(f"--etcd-{what} {path}: no such file")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise EtcdConfigError(f"cannot read {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.cacert),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd 1.0's client speaks plaintext only: this one opens a TLS channel when given
    credentials, and can re-authenticate (etcd forgets simple tokens when it restarts)."""

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kw: Any) -> None:
        self._credentials = credentials
        super().__init__(**kw)

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = aetcd.rpc.secure_channel(
                target, self._credentials, options=self._options.items()
            )
            rpc = aetcd.rpc
            if self._username is not None:
                await self.reauthenticate()
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                rpc.WatchStub(self.channel),
                timeout=self._timeout,
                metadata=self.metadata,  # type: ignore[has-type]
            )
            self._connected.set()
        except aetcd.rpc.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)
        finally:
            self._is_connecting = False

    async def reauthenticate(self) -> None:
        """Get a fresh token on the open channel; new calls and watches use it."""
        try:
            stub = self.auth_stub = aetcd.rpc.AuthStub(self.channel)
            request = aetcd.rpc.AuthenticateRequest(name=self._username, password=self._password)
            resp = await stub.Authenticate(request, timeout=self._timeout)
        except aetcd.rpc.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)
        self.metadata = (("token", resp.token),)
        if self._watcher is not None:
            # Its stream carries the old token: end it; the next watch opens one with the new.
            self._watcher._metadata = self.metadata
            await self._watcher.shutdown()


def _auth_refused(e: Exception) -> bool:
    text = str(e).lower()
    return "authentication failed" in text or "invalid user" in text


def _token_expired(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, aetcd.exceptions.UnauthenticatedError) or "invalid auth token" in text


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    version: int
    lease: int


def _kv(raw: Any) -> KV:
    return KV(raw.key, raw.value, raw.mod_revision, raw.version, raw.lease)


class Txn:
    """Builder for one etcd transaction, so callers never touch aetcd's compare objects."""

    def __init__(self, client: aetcd.Client) -> None:
        self._t = client.transactions
        self.compare: list[Any] = []
        self.success: list[Any] = []
        self.failure: list[Any] = []

    def absent(self, key: bytes) -> Txn:
        self.compare.append(self._t.version(key) == 0)
        return self

    def present(self, key: bytes) -> Txn:
        self.compare.append(self._t.version(key) > 0)
        return self

    def unchanged(self, key: bytes, mod_revision: int) -> Txn:
        """Key still at the revision we read (mod_revision 0 means: still absent)."""
        self.compare.append(self._t.mod(key) == mod_revision)
        return self

    def value_is(self, key: bytes, value: bytes) -> Txn:
        self.compare.append(self._t.value(key) == value)
        return self

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> Txn:
        self.success.append(self._t.put(key, value, lease=lease))
        return self

    def delete(self, key: bytes) -> Txn:
        self.success.append(self._t.delete(key))
        return self

    def delete_prefix(self, prefix: bytes) -> Txn:
        end = aetcd.utils.prefix_range_end(prefix)
        self.success.append(self._t.delete(prefix, range_end=end))
        return self


def parse_endpoint(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    try:
        port = parsed.port or 2379
    except ValueError:
        raise EtcdConfigError(f"bad etcd endpoint {url!r}: the port is not a number") from None
    return parsed.hostname or "127.0.0.1", port


def parse_endpoints(urls: str) -> list[str]:
    """`--etcd` takes one endpoint or several, comma-separated (the members of a cluster)."""
    found = [u.strip() for u in urls.split(",") if u.strip()]
    if not found:
        raise EtcdConfigError("no etcd endpoint given (--etcd or PXC_ETCD)")
    schemes = {u.lower().startswith("https://") for u in found}
    if len(schemes) > 1:
        raise EtcdConfigError(f"etcd endpoints mix http:// and https://: {urls}")
    for u in found:
        parse_endpoint(u)
    return found


class Etcd:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 3.0,
        settings: EtcdSettings | None = None,
        spread_by: str = "",
    ) -> None:
        """`spread_by` (a node's name): which member to start with, so that the nodes of a
        cluster, all given the same member list, share the read and watch load between the
        members instead of all using the first one."""
        self.url = url
        self.settings = settings = settings or EtcdSettings()
        self.endpoints = parse_endpoints(url)
        settings.check(self.endpoints[0])
        self.timeout = timeout
        self._current = zlib.crc32(spread_by.encode()) % len(self.endpoints) if spread_by else 0
        self._client = self._make_client(self._current)
        self._reauth_lock = asyncio.Lock()
        self._retired: list[_Client] = []

    def _make_client(self, i: int) -> _Client:
        host, port = parse_endpoint(self.endpoints[i])
        tls = self.endpoints[i].lower().startswith("https://")
        return _Client(
            host=host,
            port=port,
            username=self.settings.user or None,
            password=self.settings.password or None,
            timeout=max(1, int(self.timeout)),
            credentials=self.settings.credentials() if tls else None,
        )

    def _next_endpoint(self) -> bool:
        """After a failure: the following calls go to the next member (False if only one)."""
        if len(self.endpoints) < 2:
            return False
        self._retired.append(self._client)
        self._current = (self._current + 1) % len(self.endpoints)
        self._client = self._make_client(self._current)
        return True

    async def connect(self) -> None:
        """Connect to the first endpoint that answers (each member in turn)."""
        errors: list[str] = []
        for _ in self.endpoints:
            try:
                await self._connect_one()
                return
            except EtcdUnavailable as e:
                errors.append(str(e))
                if not self._next_endpoint():
                    raise
        raise EtcdUnavailable("; ".join(errors))

    async def _connect_one(self) -> None:
        url = self.endpoints[self._current]
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.connect()
            # The channel connects lazily: one read proves etcd is really there.
            await self._call(lambda: self._client.get(b"/pxc-probe"), failover=False)
        except EtcdUnavailable:
            raise
        except (aetcd.exceptions.ClientError, TimeoutError, OSError) as e:
            if self.settings.user and _auth_refused(e):
                raise EtcdConfigError(
                    f"etcd at {self.url} refused user {self.settings.user!r}: {_one_line(str(e))}"
                ) from None
            detail = _one_line(str(e)) or type(e).__name__
            if "handshake" in detail.lower():
                detail += " (TLS: check --etcd-cacert, --etcd-cert and --etcd-key)"
            raise EtcdUnavailable(f"etcd at {url} is unreachable: {detail}") from None

    async def close(self) -> None:
        for client in [*self._retired, self._client]:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await client.close()
        self._retired.clear()

    async def _call(self, call: Callable[[], Awaitable[Any]], *, failover: bool = True) -> Any:
        """One etcd call; with several endpoints, a failed call is tried once more on the next
        member (a member that is down or cut off must not take the node's lease with it)."""
        try:
            return await self._call_once(call)
        except EtcdUnavailable:
            if not failover or not self._next_endpoint():
                raise
            try:
                async with asyncio.timeout(self.timeout):
                    await self._client.connect()
            except (aetcd.exceptions.ClientError, TimeoutError, OSError):
                pass
            return await self._call_once(call)

    async def _call_once(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that
            # races with the call's completion (gh-86296).
            async with asyncio.timeout(self.timeout):
                try:
                    return await call()
                except aetcd.exceptions.ClientError as e:
                    if not (self.settings.user and _token_expired(e)):
                        raise
                    # etcd forgot our token (it restarted): authenticate again, retry once.
                    stale = self._client.metadata  # type: ignore[has-type]
                    async with self._reauth_lock:
                        if self._client.metadata is stale:  # not renewed by another call yet
                            await self._client.reauthenticate()
                    return await call()
        except (aetcd.exceptions.ClientError, TimeoutError) as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # gRPC reports our own cancellation as a CANCELLED call error: give the
                # cancellation back, or loops that survive etcd outages would survive it too.
                raise asyncio.CancelledError() from e
            detail = _one_line(str(e)) or type(e).__name__
            if not self.settings.user and "user name is empty" in detail:
                raise EtcdConfigError(
                    f"etcd at {self.url} requires a user: pass --etcd-user and "
                    "--etcd-password-file (or PXC_ETCD_USER, PXC_ETCD_PASSWORD)"
                ) from None
            where = self.endpoints[self._current]
            raise EtcdUnavailable(f"etcd at {where} is unreachable: {detail}") from None

    async def get(self, key: bytes) -> KV | None:
        raw = await self._call(lambda: self._client.get(key))
        return None if raw is None else _kv(raw)

    async def get_prefix(self, prefix: bytes) -> list[KV]:
        res = await self._call(lambda: self._client.get_prefix(prefix))
        return [_kv(kv) for kv in res]

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self._call(lambda: self._client.put(key, value, lease=lease))

    async def delete(self, key: bytes) -> None:
        await self._call(lambda: self._client.delete(key))

    def txn(self) -> Txn:
        return Txn(self._client)

    async def commit(self, txn: Txn) -> bool:
        ok, _ = await self._call(
            lambda: self._client.transaction(txn.compare, txn.success, txn.failure)
        )
        return bool(ok)

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call(lambda: self._client.lease(ttl))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """Returns the remaining TTL; <= 0 means the lease is gone."""
        reply = await self._call(lambda: self._client.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease. One etcd no longer has (it expired, or was revoked already) is
        revoked: a node restarting just as its previous run's lease expires must not stop."""

        async def revoke() -> None:
            try:
                await self._client.revoke_lease(lease_id)
            except aetcd.exceptions.ClientError as e:
                if "lease not found" not in str(e):
                    raise

        await self._call(revoke)

    async def wake_on_changes(
        self,
        prefix: bytes,
        wake: asyncio.Event,
        *,
        on_event: Callable[[bytes, bytes | None], None] | None = None,
        on_open: Callable[[], None] | None = None,
    ) -> None:
        """Set `wake` on every change under `prefix`, forever; survives etcd restarts.

        Reconcile loops wait on `wake` (with a timeout as a safety net), then re-read state, so
        a lost or coalesced event costs latency, never correctness. `on_event(key, value)`
        (value None: deleted) sees each change first; `on_open()` is called each time the
        watch is (re)opened, before `wake` is set: what it missed meanwhile must be re-read.
        """
        while True:
            try:
                watch = await self._call(lambda: self._client.watch_prefix(prefix))
                if on_open is not None:
                    on_open()
                wake.set()  # events may have been missed while no watch was open
                try:
                    async for event in watch:
                        if on_event is not None:
                            deleted = event.kind == "DELETE"
                            on_event(event.kv.key, None if deleted else event.kv.value)
                        wake.set()
                finally:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.timeout):
                            await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)
