"""AES-256-GCM encryption of record bodies, with key ids and rotation.

Keys come from ``HELIXAGENT_ENCRYPTION_KEYS`` (``id1:base64key,id2:base64key``; the LAST one is active) or
``encryption.key_file`` (the same ``id:base64key[:created]`` entries, one per line or comma separated,
``#`` comments allowed; again the last is active).  Each key is 32 bytes (base64 of 32 random bytes:
``helixagent encryption generate-key``).

A ciphertext is ``0x01 | nonce(12) | AES-GCM(ciphertext+tag)``; the associated data binds it to its row
and column (``request_id`` NUL ``column``), so a value copied to another row or column fails to decrypt,
and so does any flipped byte: that raises :class:`TamperedRecord`, never returns garbage.

Key age (for ``encryption.key_rotation_days``): the optional third field ``created`` (``YYYY-MM-DD``) of an
entry, else a date embedded in the key id (``k20250131``, ``2025-01-31-a``...).  Without either the age is
unknown and only an info line says so.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# cryptography (about 7 MB resident) is imported by the first Keyring, i.e. only when encryption is enabled.

ENV_VAR = "HELIXAGENT_ENCRYPTION_KEYS"
VERSION = 1
_V = bytes([VERSION])
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DATE_RE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


class KeyError_(ValueError):
    """A key configuration problem (message names the setting)."""


class TamperedRecord(Exception):
    """A ciphertext failed authentication: modified, moved to another row/column, or the wrong key."""


class UnknownKey(Exception):
    """A row is encrypted with a key id that is not configured."""


@dataclass(frozen=True)
class Key:
    id: str
    material: bytes
    created: dt.date | None

    def age_days(self, today: dt.date | None = None) -> int | None:
        created = self.created or _date_in(self.id)
        if created is None:
            return None
        return ((today or dt.datetime.now(dt.timezone.utc).date()) - created).days


def _date_in(key_id: str) -> dt.date | None:
    m = _DATE_RE.search(key_id)
    if not m:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def parse_keys(text: str, source: str) -> list[Key]:
    keys: list[Key] = []
    entries: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.extend(e.strip() for e in line.split(",") if e.strip())
    seen: set[str] = set()
    for i, e in enumerate(entries):
        parts = e.split(":")
        if len(parts) not in (2, 3):
            raise KeyError_(f"{source}: entry {i + 1} must be id:base64key or id:base64key:YYYY-MM-DD")
        kid, b64 = parts[0].strip(), parts[1].strip()
        if not _KEY_ID_RE.match(kid):
            raise KeyError_(f"{source}: entry {i + 1}: key id {kid!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if kid in seen:
            raise KeyError_(f"{source}: key id {kid!r} appears twice")
        seen.add(kid)
        try:
            material = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise KeyError_(f"{source}: key {kid!r} is not valid base64") from None
        if len(material) != 32:
            raise KeyError_(f"{source}: key {kid!r} is {len(material)} bytes; AES-256 needs 32 "
                            "(generate one with `helixagent encryption generate-key`)")
        created = None
        if len(parts) == 3:
            try:
                created = dt.date.fromisoformat(parts[2].strip())
            except ValueError:
                raise KeyError_(f"{source}: key {kid!r}: created date {parts[2]!r} is not YYYY-MM-DD") from None
        keys.append(Key(kid, material, created))
    return keys


class Keyring:
    """The configured keys; encrypts with the active (last) key, decrypts with whichever key a row names."""

    def __init__(self, keys: list[Key]):
        if not keys:
            raise KeyError_("no encryption key")
        self.keys = {k.id: k for k in keys}
        self.active = keys[-1]
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self._aead: dict[str, AESGCM] = {k.id: AESGCM(k.material) for k in keys}
        self._active_aead = self._aead[self.active.id]
        self.active_id = self.active.id

    @classmethod
    def from_config(cls, enc_cfg: object, env: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring for ``encryption:``; None when encryption is disabled."""
        env = os.environ if env is None else env
        if not getattr(enc_cfg, "enabled", False):
            return None
        keys: list[Key] = []
        raw = env.get(ENV_VAR, "").strip()
        key_file = getattr(enc_cfg, "key_file", None)
        if raw:
            keys = parse_keys(raw, ENV_VAR)
        elif key_file:
            try:
                with open(key_file, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise KeyError_(f"encryption.key_file: cannot read {key_file!r}: {exc.strerror}") from None
            keys = parse_keys(text, f"encryption.key_file {key_file!r}")
        if not keys:
            raise KeyError_(f"encryption.enabled is true but no key is configured: set {ENV_VAR} "
                            "(id:base64key,...) or encryption.key_file")
        return cls(keys)

    def encrypt(self, data: bytes, request_id: str, column: str) -> bytes:
        nonce = os.urandom(12)
        return _V + nonce + self._active_aead.encrypt(nonce, data, (request_id + "\0" + column).encode())

    def decrypt(self, blob: bytes, key_id: str, request_id: str, column: str) -> bytes:
        aead = self._aead.get(key_id)
        if aead is None:
            raise UnknownKey(f"record {request_id}: {column} is encrypted with key {key_id!r}, which is not "
                             f"configured (add it to {ENV_VAR} or encryption.key_file)")
        if len(blob) < 1 + 12 + 16 or blob[0] != VERSION:
            raise TamperedRecord(f"record {request_id}: {column} is not a HelixAgent ciphertext "
                                 "(truncated or modified)")
        from cryptography.exceptions import InvalidTag   # loaded already: the Keyring built an AESGCM
        try:
            return aead.decrypt(blob[1:13], blob[13:], (request_id + "\0" + column).encode())
        except InvalidTag:
            raise TamperedRecord(f"record {request_id}: {column} failed authentication with key {key_id!r}: "
                                 "the ciphertext was modified or moved from another row") from None


def generate_key_entry(today: dt.date | None = None) -> str:
    d = today or dt.datetime.now(dt.timezone.utc).date()
    kid = f"k{d:%Y%m%d}-{os.urandom(3).hex()}"
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"
