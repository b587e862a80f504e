"""The record journal (spool): append-only segment files of checksummed frames.

Every record is appended to the current segment by the request path (one ``write(2)`` into the page
cache, no fsync) *before* the response is sent, so a record survives the process being killed (SIGKILL,
OOM) at any moment.  The writer deletes a segment once every record in it is committed to the database;
a segment whose records could not be inserted (database down, queue full) is kept and replayed, in order,
when the database is back — and at the next start after a crash.

File layout: ``<spool_dir>/<time_ns>-<pid>-<n>.spool``; the name orders segments by creation.  The owning
process holds an exclusive ``flock`` on each of its segments, so several worker processes can share one
spool_dir and a starting process replays only the segments of processes that are gone.

Frame: ``b"HXR1" | u32 payload length | u32 crc32(payload) | payload`` with payload
``u32 meta length | u32 request-body length | u32 response-body length | meta (JSON array) | bodies``;
a body length of 0xFFFFFFFF means "none".  A torn frame at the end of a segment (the process died in the
middle of write(2)) or a damaged frame is skipped: the reader searches for the next magic.
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from typing import Any, Iterator

import orjson

log = logging.getLogger("helixagent.store")

MAGIC = b"HXR1"
_HDR = struct.Struct(">4sII")
_LENS = struct.Struct(">III")
_NONE = 0xFFFFFFFF
SUFFIX = ".spool"

# One record as it travels: [meta list, request body bytes|None, response body bytes|None]
Item = tuple[list[Any], bytes | None, bytes | None]


def encode_frame(meta: list[Any], rb: bytes | None, pb: bytes | None) -> bytes:
    m = orjson.dumps(meta)
    payload = _LENS.pack(len(m), _NONE if rb is None else len(rb), _NONE if pb is None else len(pb)) + m
    if rb:
        payload += rb
    if pb:
        payload += pb
    return _HDR.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> Item:
    ml, rl, pl = _LENS.unpack_from(payload, 0)
    off = _LENS.size
    meta = orjson.loads(payload[off:off + ml])
    off += ml
    rb = None
    if rl != _NONE:
        rb = payload[off:off + rl]
        off += rl
    pb = None
    if pl != _NONE:
        pb = payload[off:off + pl]
        off += pl
    if off != len(payload):
        raise ValueError("frame lengths do not add up")
    return meta, rb, pb


def read_frames(data: bytes, source: str = "spool") -> Iterator[Item]:
    """Decode every intact frame; damaged or torn ones are skipped (and logged)."""
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos:pos + 4] != MAGIC or pos + _HDR.size > n:
            nxt = data.find(MAGIC, pos + 1)
            log.error("%s: damaged data at offset %d (%d bytes skipped)", source, pos,
                      (nxt if nxt >= 0 else n) - pos)
            if nxt < 0:
                return
            pos = nxt
            continue
        _, length, crc = _HDR.unpack_from(data, pos)
        start = pos + _HDR.size
        end = start + length
        payload = data[start:end]
        if end > n or zlib.crc32(payload) != crc:
            nxt = data.find(MAGIC, pos + 1)
            if end > n and nxt < 0:
                log.warning("%s: torn record at the end (offset %d), skipped", source, pos)
                return
            log.error("%s: frame at offset %d fails its checksum, skipped", source, pos)
            if nxt < 0:
                return
            pos = nxt
            continue
        try:
            yield decode_payload(payload)
        except Exception as exc:  # noqa: BLE001 - a corrupt frame on disk: logged as ERROR, the others replay
            log.error("%s: frame at offset %d does not decode (%s), skipped", source, pos, exc)
        pos = end


class Segment:
    __slots__ = ("path", "name", "fd", "pending", "failed", "sealed", "size", "opened", "dirty")

    def __init__(self, path: str, fd: int, failed: bool = False, sealed: bool = False):
        self.path = path
        self.name = os.path.basename(path)
        self.fd = fd
        self.pending = 0       # records queued for the database and not yet committed
        self.failed = failed   # some record could not be inserted: replay the whole file
        self.sealed = sealed   # no more appends
        self.size = 0
        self.opened = time.monotonic()
        self.dirty = False     # written since the last fsync

    def release(self, unlink: bool) -> None:
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self.fd >= 0:
            try:
                os.close(self.fd)   # releases the flock
            except OSError:
                pass
            self.fd = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


class Journal:
    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.pid = os.getpid()
        self._n = 0
        self.current: Segment | None = None
        self.on_new: Any = None   # called with each new segment

    def new_segment(self) -> Segment:
        self._n += 1
        path = os.path.join(self.dir, f"{time.time_ns():020d}-{self.pid}-{self._n:06d}{SUFFIX}")
        # lock first, under a name the orphan scan ignores, so no other process can take it for a dead one
        tmp = path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            raise
        seg = Segment(path, fd)
        self.current = seg
        if self.on_new is not None:
            self.on_new(seg)
        return seg

    def append(self, frame: bytes) -> Segment:
        """Write one frame to the current segment (request path: one write(2), no fsync)."""
        seg = self.current
        if seg is None:
            seg = self.new_segment()
        n = os.write(seg.fd, frame)
        if n != len(frame):   # a short write on a regular file means the disk is full
            seg.failed = True
            raise OSError(28, f"short write to {seg.path}")
        seg.size += n
        seg.dirty = True
        return seg

    def seal(self) -> Segment | None:
        seg = self.current
        self.current = None
        if seg is not None:
            seg.sealed = True
        return seg

    def orphans(self, known: set[str]) -> list[Segment]:
        """Segments left by processes that are gone (their flock is free), oldest first."""
        out: list[Segment] = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(SUFFIX + ".new"):   # a process died between creating and locking it: empty
                self._remove_if_unlocked(os.path.join(self.dir, name))
                continue
            if not name.endswith(SUFFIX) or name in known:
                continue
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)    # a live process owns it
                continue
            if not os.path.exists(path):   # replayed and removed by another process meanwhile
                os.close(fd)
                continue
            out.append(Segment(path, fd, failed=True, sealed=True))
        return out

    @staticmethod
    def _remove_if_unlocked(path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            if time.time() - os.fstat(fd).st_mtime < 60:   # maybe being created right now
                return
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def write_rejected(self, frames: list[bytes]) -> str:
        d = os.path.join(self.dir, "rejected")
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(d, f"{time.time_ns():020d}-{self.pid}{SUFFIX}")
        with open(path, "ab") as f:
            for fr in frames:
                f.write(fr)
            f.flush()
            os.fsync(f.fileno())
        return path
