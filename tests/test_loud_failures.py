"""Our own failures are loud: a bug in the key lookup or the usage query is a 500 (propagates), never passed
off as a database outage (a 503 or a stale key), while a real outage still is one."""
from __future__ import annotations

import asyncio

import pytest
import sqlalchemy.exc

from helixagent.auth import Authenticator
from helixagent.errors import GatewayError


class _Store:
    def __init__(self, exc: BaseException):
        self.exc = exc

    async def by_hash(self, h: str) -> None:
        raise self.exc


def _identify(exc: BaseException) -> None:
    auth = Authenticator("master-key-for-tests", _Store(exc))  # type: ignore[arg-type]
    asyncio.run(auth.identify("hx-" + "a" * 40))


@pytest.mark.parametrize("exc", [OSError("connection refused"), asyncio.TimeoutError(),
                                 sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed"))])
def test_a_database_outage_is_a_503(exc):
    with pytest.raises(GatewayError) as ei:
        _identify(exc)
    assert ei.value.status == 503 and ei.value.code == "auth_unavailable"


@pytest.mark.parametrize("exc", [TypeError("by_hash() takes 1 positional argument"), KeyError("id"),
                                 AttributeError("'NoneType' object has no attribute 'role'")])
def test_a_bug_in_the_key_lookup_is_not_an_outage(exc):
    with pytest.raises(type(exc)):
        _identify(exc)
