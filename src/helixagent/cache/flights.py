"""In-flight de-duplication across gateway instances that share a Redis (``cache.dedupe_across_instances``).

Inside one process, identical requests already share one upstream call (:class:`~.service.Flight`): the
first is the process's *local leader*, the others follow it in memory.  This module makes the local
leaders of several instances agree on one *global leader* through Redis; only the local leader of each
instance talks to Redis, so one flight costs each instance one Redis reader whatever its number of
identical requests.

Keys, all under the entry's own hash tag (one Cluster slot per entry; see ``RedisBackend.rkey``):

* ``<key_prefix>{<hash>}:lead`` -- the lease: ``SET NX PX <flight_lease>`` holding the leader's random
  token (one script call that also reads the entry, or the holder's token), renewed every third of the
  lease while the leader works (a Lua compare-and-renew), deleted with the last entry (one script);
* ``<key_prefix>{<hash>}:fl:<token>`` -- the leader's Redis Stream.  Entries (``k`` kind, ``d`` data):
  ``h`` the stream began (provider, model), ``c`` a batch of chunks, ``d`` the stream is complete (the
  assembled answer, or empty when it is not a storable answer), ``r`` a non-streamed answer, ``e`` an
  error (the followers raise the same error), ``x`` the leader went away before an answer (followers
  start over).  Data is sealed with the cache's :class:`~.backends.Sealer` when ``encryption.enabled``
  (the stream key is the associated data).  The stream expires ``STREAM_TTL`` after its last write.

A follower (an instance that lost the ``SET NX``) reads the stream with ``XREAD BLOCK`` in slices of at
most ``SLICE`` seconds and checks the lease between slices:

* before the answer begins, the wait is bounded by the request's time budget
  (``routing.request_timeout_ms``) plus one lease: past it the follower answers 504;
* the lease gone without a last entry (the leader was killed, or lost Redis): the follower re-reads the
  entry (a stored answer is a hit), then tries to take the lease -- one follower becomes the new leader,
  the others follow it; after ``MAX_TAKEOVERS`` changes of leader a follower goes upstream alone;
* the same mid-stream (chunks already relayed): the follower's stream ends with a ``stream_error`` (an
  answer cannot be spliced from two upstream calls);
* Redis failing (:data:`~helixagent.redis_client.OUTAGE`) or the pool exhausted: the request goes
  upstream alone (before the answer began) or ends with a ``stream_error`` (mid-stream), like the cache's
  own outage policy (served without it).

The leader publishes every outcome; a streamed leader's upstream is read to its end while it leads
(followers on other instances may be reading it), then stored as usual.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, AsyncIterator

import orjson

from ..errors import GatewayError
from .. import redis_client
from .backends import BackendUnavailable, RedisBackend

log = logging.getLogger("helixagent.cache")

SLICE = 1.0            # longest single XREAD BLOCK (seconds); the lease is checked between slices
STREAM_TTL = 30_000    # ms a flight stream lives after its last write
MAX_TAKEOVERS = 3      # changes of leader a follower sits through before it goes upstream alone

# KEYS[1] lease, KEYS[2] stream; ARGV token, lease ms, stream ttl ms.  Same slot (one hash tag).
RENEW_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3])) end
  return 1
end
return 0
"""
# KEYS[1] lease, KEYS[2] entry; ARGV token, lease ms.  One round trip: {1, entry or false} when the lease
# is ours (the entry: stored by a leader that let go between our look-up and this call), else
# {0, the holder's token or false}.
CLAIM_LUA = r"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  return {1, redis.call('GET', KEYS[2])}
end
return {0, redis.call('GET', KEYS[1])}
"""
# KEYS[1] stream, KEYS[2] lease; ARGV ttl ms, token, kind, data.  The last entry, then the lease deleted
# if it is still ours -- one round trip.
FINISH_LUA = r"""
redis.call('XADD', KEYS[1], '*', 'k', ARGV[3], 'd', ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""
# KEYS[1] stream; ARGV ttl ms, then (kind, data) pairs appended in order.
APPEND_LUA = r"""
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', 'k', ARGV[i], 'd', ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


def error_to_bytes(exc: GatewayError) -> bytes:
    return orjson.dumps({"s": exc.status, "m": exc.message, "t": exc.type, "c": exc.code, "p": exc.param,
                         "pr": exc.provider, "r": exc.retryable, "ra": exc.retry_after, "h": exc.headers,
                         "k": exc.kind})


def error_from_bytes(raw: bytes) -> GatewayError:
    d = orjson.loads(raw)
    return GatewayError(int(d["s"]), str(d["m"]), type=d.get("t"), code=d.get("c"), param=d.get("p"),
                        provider=d.get("pr"), retryable=bool(d.get("r")), retry_after=d.get("ra"),
                        headers={str(k): str(v) for k, v in (d.get("h") or {}).items()}, kind=d.get("k"))


def _stream_error(msg: str, provider: str | None = None) -> GatewayError:
    return GatewayError(502, msg, provider=provider, kind="stream_error")


class LeaderGone(GatewayError):
    """The leader of a streamed flight went away mid-stream (its lease lapsed, or it gave up)."""

    def __init__(self, msg: str):
        super().__init__(502, msg, kind="stream_error")


class Lease:
    """A won ``SET NX``: this process leads the flight of ``key`` on every instance."""

    __slots__ = ("remote", "key", "token", "lead_key", "stream_key", "task", "done")

    def __init__(self, remote: "RemoteFlights", key: str, token: str):
        self.remote = remote
        self.key = key
        self.token = token
        self.lead_key = remote.rb.rkey(key, "lead")
        self.stream_key = remote.rb.rkey(key, "fl", token)
        self.task: asyncio.Task[None] | None = None
        self.done = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        r = self.remote
        every = r.lease_s / 3
        while not self.done:
            await asyncio.sleep(every)
            if self.done:
                return
            try:
                ok = await r.rb._call(r.renew, [self.lead_key, self.stream_key],
                                      [self.token, r.lease_ms, STREAM_TTL])
            except BackendUnavailable:
                continue  # Redis is failing: the lease may lapse; followers then take over (bounded)
            if not ok:
                log.warning("cache: lost the lease of an in-flight request (Redis restarted or this process "
                            "stalled past cache.flight_lease); another instance may call the upstream too")
                return

    async def append(self, entries: list[tuple[bytes, bytes]]) -> bool:
        """Append entries to the flight stream.  False: Redis is failing (the followers will notice)."""
        r = self.remote
        args: list[Any] = [STREAM_TTL]
        for kind, data in entries:
            args += (kind, r.seal(self.stream_key, data))
        try:
            await r.rb._call(r.append_script, [self.stream_key], args)
            return True
        except BackendUnavailable:
            return False

    async def finish(self, kind: bytes, data: bytes = b"") -> None:
        """The last entry, then give the lease up (only if it is still ours): one script call."""
        self.done = True
        if self.task is not None:
            self.task.cancel()
        r = self.remote
        try:
            await r.rb._call(r.finish_script, [self.stream_key, self.lead_key],
                             [STREAM_TTL, self.token, kind, r.seal(self.stream_key, data)])
        except BackendUnavailable:
            pass  # the lease expires on its own; the followers notice within a lease


class Outcome:
    """What :meth:`RemoteFlights.join` found.  ``kind``: ``lead`` (``lease``), ``hit`` (``raw``: a stored
    entry), ``resp`` (``raw``: the leader's answer payload), ``stream`` (``chunks``: a live relay),
    ``error`` (``error``) or ``alone`` (go upstream without de-duplication)."""

    __slots__ = ("kind", "lease", "raw", "chunks", "error", "provider", "model")

    def __init__(self, kind: str, *, lease: Lease | None = None, raw: bytes | None = None,
                 chunks: AsyncIterator[dict[str, Any]] | None = None, error: GatewayError | None = None,
                 provider: str | None = None, model: str | None = None):
        self.kind = kind
        self.lease = lease
        self.raw = raw
        self.chunks = chunks
        self.error = error
        self.provider = provider
        self.model = model


class RemoteFlights:
    """The Redis side of de-duplication: leases, flight streams, followers."""

    def __init__(self, rb: RedisBackend, lease: float, budget: float, entry_backend: Any,
                 owns_backend: bool = False):
        self.rb = rb                   # outage accounting + the non-blocking client
        self.owns = owns_backend       # False: rb is the Redis cache's backend (started and closed by it)
        self.lease_s = lease
        self.lease_ms = max(1, int(lease * 1000))
        self.budget = budget           # the request's time budget (routing.request_timeout_ms)
        self.entry_backend = entry_backend  # the cache backend (a stored entry ends a wait early)
        self.slice = min(SLICE, lease / 2)
        self.blocking: Any = None
        self.renew: Any = None
        self.claim_script: Any = None
        self.finish_script: Any = None
        self.append_script: Any = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.led = 0          # flights this process led across instances
        self.followed = 0     # flights this process followed from another instance
        self.takeovers = 0    # leases taken over from a leader that went away

    async def start(self) -> None:
        if self.owns:
            await self.rb.start()
        c = self.rb.client
        self.renew = c.register_script(RENEW_LUA)
        self.claim_script = c.register_script(CLAIM_LUA)
        self.finish_script = c.register_script(FINISH_LUA)
        self.append_script = c.register_script(APPEND_LUA)
        # XREAD BLOCK holds its connection for up to one slice: a client whose socket timeout covers it
        self.blocking = redis_client.make_client(self.rb.url, pool_size=self.rb.pool_size,
                                                 pool_timeout=self.rb.pool_timeout,
                                                 timeout=self.slice + self.rb.timeout, connect_timeout=self.rb.timeout)

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.blocking is not None:
            await self.blocking.aclose()
            self.blocking = None
        if self.owns:
            await self.rb.close()

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def seal(self, key: str, data: bytes) -> bytes:
        s = self.rb.sealer
        return s.seal(key, data) if s is not None and data else data

    def unseal(self, key: str, data: bytes) -> bytes:
        s = self.rb.sealer
        if s is None or not data:
            return data
        out = s.unseal(key, data)
        if out is None:
            raise _stream_error("an in-flight answer shared by another instance could not be decrypted "
                                "(the instances' encryption keys differ)")
        return out

    # -- claiming ------------------------------------------------------------------------------------
    async def claim(self, key: str) -> tuple[Lease | None, bytes | None]:
        """``SET NX`` the lease.  -> (our lease, the entry's raw value if one is stored) or (None, the
        holder's token).  Raises BackendUnavailable."""
        token = secrets.token_hex(8)
        lease = Lease(self, key, token)
        rb = self.rb
        won, val = await rb._call(self.claim_script, [lease.lead_key, rb.rkey(key)], [token, self.lease_ms])
        if not won:
            return None, val
        lease.start()
        self.led += 1
        return lease, val

    async def _token(self, key: str) -> str | None:
        raw = await self.rb._call(self.rb.client.get, self.rb.rkey(key, "lead"))
        return raw.decode() if raw is not None else None

    async def join(self, key: str, streamed: bool, follow: bool) -> Outcome:
        """Lead the flight of ``key`` or follow its leader on another instance (``follow`` False: a
        ``no-cache`` request, which never joins another call: lead or go alone)."""
        try:
            return await self._join(key, streamed, follow)
        except BackendUnavailable:
            return Outcome("alone")

    async def _join(self, key: str, streamed: bool, follow: bool) -> Outcome:
        deadline = time.monotonic() + self.budget + self.lease_s
        changes = spins = 0
        token: str | None = None
        while True:
            lease, val = await self.claim(key)
            if lease is not None:
                if token is not None:
                    self.takeovers += 1   # we followed a leader that went away, and now lead
                if follow and val is not None and not self.entry_backend.sync:
                    # a leader that stored its answer and released the lease between our look-up and our
                    # SET NX: serve its entry rather than call the upstream again
                    raw = self.entry_backend.opened(key, val, quiet=True)
                    if raw is not None:
                        self.spawn(lease.finish(b"x"))
                        return Outcome("hit", raw=raw)
                return Outcome("lead", lease=lease)
            if not follow:
                return Outcome("alone")
            new = val.decode() if val is not None else None
            if new is None:
                spins += 1
                if spins > MAX_TAKEOVERS * 3:
                    return Outcome("alone")
                continue  # released just now: race for it again
            if token is not None and new != token:
                changes += 1
            if changes >= MAX_TAKEOVERS:
                return Outcome("alone")
            token = new
            got = await self._follow(key, token, streamed, deadline)
            if got is not None:
                self.followed += 1
                return got
            # the leader went away before an answer: a stored entry ends it, else race for the lease
            if not self.entry_backend.sync:
                raw = await self._entry(key)
                if raw is not None:
                    return Outcome("hit", raw=raw)

    async def _entry(self, key: str) -> bytes | None:
        raw: bytes | None = await self.entry_backend.get(key)
        return raw

    async def _read(self, stream_key: str, last: bytes, block_s: float) -> list[tuple[bytes, dict[bytes, bytes]]]:
        ms = max(1, int(block_s * 1000))
        got = await self.rb._call(self.blocking.xread, {stream_key: last}, None, ms)
        if not got:
            return []
        out: list[tuple[bytes, dict[bytes, bytes]]] = got[0][1]
        return out

    async def _follow(self, key: str, token: str, streamed: bool, deadline: float) -> Outcome | None:
        """Wait for the first entry of ``token``'s flight.  None: that leader went away before answering."""
        sk = self.rb.rkey(key, "fl", token)
        last = b"0-0"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome("error", error=GatewayError(
                    504, f"an identical request in flight on another instance did not answer within "
                         f"{self.budget:g}s", type="timeout_error", code="upstream_timeout", kind="timeout"))
            entries = await self._read(sk, last, min(self.slice, left))
            if not entries:
                if await self._token(key) != token:
                    return None  # lease expired (leader gone) or handed over
                continue
            eid, f = entries[0]
            kind = f.get(b"k", b"")
            data = self.unseal(sk, f.get(b"d", b""))
            if kind == b"x":
                return None
            if kind == b"e":
                return Outcome("error", error=error_from_bytes(data))
            if kind == b"r":
                return Outcome("resp", raw=data)
            if kind == b"h":
                head = orjson.loads(data)
                relay = self._relay(key, token, sk, eid, entries[1:])
                if streamed:
                    return Outcome("stream", chunks=relay, provider=head.get("p"), model=head.get("m"))
                return await self._drain(relay)   # None: the leader went away (nothing sent yet: start over)
            last = eid  # an entry kind we do not know (a newer version): skip it

    async def _drain(self, relay: AsyncIterator[dict[str, Any]]) -> Outcome | None:
        """A non-streamed follower of a streamed leader: wait for the assembled answer.  None: the leader
        went away mid-stream -- this client has received nothing yet, so it may start over."""
        try:
            async for _ in relay:
                pass
        except LeaderGone:
            return None
        except GatewayError as exc:
            return Outcome("error", error=exc)
        payload = getattr(relay, "payload", None)
        if not payload:
            return Outcome("error", error=_stream_error("the upstream stream ended without an answer"))
        return Outcome("resp", raw=payload)

    def _relay(self, key: str, token: str, sk: str, last: bytes,
               pending: list[tuple[bytes, dict[bytes, bytes]]]) -> "Relay":
        return Relay(self, key, token, sk, last, pending)


class Relay:
    """The chunks of a streamed leader on another instance, as they come.  ``payload`` is the assembled
    answer once the stream completed (``d`` entry)."""

    def __init__(self, remote: RemoteFlights, key: str, token: str, sk: str, last: bytes,
                 pending: list[tuple[bytes, dict[bytes, bytes]]]):
        self.remote = remote
        self.key = key
        self.token = token
        self.sk = sk
        self.last = last
        self.pending = list(pending)
        self.buf: list[dict[str, Any]] = []
        self.payload: bytes | None = None
        self.ended = False

    def __aiter__(self) -> "Relay":
        return self

    async def __anext__(self) -> dict[str, Any]:
        r = self.remote
        while True:
            if self.buf:
                return self.buf.pop(0)
            if self.ended:
                raise StopAsyncIteration
            if not self.pending:
                try:
                    self.pending = await r._read(self.sk, self.last, r.slice)
                    if not self.pending and await r._token(self.key) != self.token:
                        raise LeaderGone("the instance serving this stream went away mid-stream")
                except BackendUnavailable:
                    raise _stream_error("Redis failed while relaying a stream shared with another "
                                        "instance") from None
                continue
            eid, f = self.pending.pop(0)
            self.last = eid
            kind = f.get(b"k", b"")
            data = r.unseal(self.sk, f.get(b"d", b""))
            if kind == b"c":
                self.buf.extend(orjson.loads(data))
            elif kind == b"d":
                self.payload = data or None
                self.ended = True
            elif kind == b"e":
                self.ended = True
                raise error_from_bytes(data)
            elif kind == b"x":
                self.ended = True
                raise LeaderGone("the instance serving this stream gave it up mid-stream")

    async def aclose(self) -> None:
        self.ended = True


async def publish_stream(bc: Any, lease: Lease, reader: Any) -> None:
    """The leader's side of a streamed flight: ``reader`` (of the :class:`~.service.Broadcast`) appends
    its chunks to the flight stream in batches (whatever arrived since the last append), then the
    outcome; the lease is given up once the answer is stored."""
    head = False
    ok = True
    try:
        while True:
            batch: list[dict[str, Any]] = []
            try:
                batch.append(await reader.__anext__())
            except StopAsyncIteration:
                break
            except GatewayError:
                break
            while reader.i < len(bc.chunks):      # everything else already buffered, in one append
                batch.append(bc.chunks[reader.i])
                reader.i += 1
            if ok:
                entries: list[tuple[bytes, bytes]] = []
                if not head:
                    entries.append((b"h", orjson.dumps({"p": bc.provider, "m": bc.model})))
                    head = True
                entries.append((b"c", orjson.dumps(batch)))
                ok = await lease.append(entries)
        if bc.task is not None:
            await asyncio.wait([bc.task])   # stored before the lease is given up
        if bc.error is not None:
            await lease.finish(b"e", error_to_bytes(bc.error))
        else:
            if not head:
                await lease.append([(b"h", orjson.dumps({"p": bc.provider, "m": bc.model}))])
            await lease.finish(b"d", bc.payload or b"")
    except asyncio.CancelledError:
        lease.done = True
        if lease.task is not None:
            lease.task.cancel()
        raise
    finally:
        await reader.aclose()

