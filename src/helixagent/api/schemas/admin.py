"""The schemas of HelixAgent's own APIs: the admin keys API bodies and the ``GET /v1/usage`` query.
Their objects are closed: a misspelt field is an error naming it, never silently ignored."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Field, with_config
from typing_extensions import TypedDict

from .base import CLOSED, number, validator

MAX_DURATION = 100 * 365.25 * 86400.0   # 100 years, in seconds: any longer is a mistake, not a policy
# non-empty, at most 255 characters, not only blanks, no NUL (PostgreSQL text cannot hold it)
Name = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")]
QueryText = Annotated[str, Field(max_length=1024, pattern=r"^[^\x00]*$")]
# a number of seconds or a string such as 90s, 30d (parsed by config.parse_duration, then bounded)
Duration = Union[number(0, MAX_DURATION), Annotated[str, Field(max_length=64)]]


@with_config(CLOSED)
class CreateKeyBody(TypedDict, total=False):
    user_id: Union[Name, None]
    user: Union[Name, None]
    application: Union[Name, None]
    app: Union[Name, None]
    role: Union[str, None]
    expires_in: Union[Duration, None]
    expires_at: Union[Annotated[str, Field(max_length=64)], None]
    limits: Union[dict[str, Any], None]


@with_config(CLOSED)
class RotateBody(TypedDict, total=False):
    grace: Union[Duration, None]


@with_config(CLOSED)
class KeysQuery(TypedDict, total=False):
    user_id: QueryText
    application: QueryText


# "from" is a Python keyword, hence the functional form
UsageQuery = with_config(CLOSED)(TypedDict("UsageQuery", {  # type: ignore[operator]
    "from": QueryText, "to": QueryText, "user_id": QueryText, "application": QueryText,
    "group_by": Literal["day", "provider", "model", "user", "application"]}, total=False))

check_create_key: Callable[[Any], Any] = validator(CreateKeyBody)
check_rotate: Callable[[Any], Any] = validator(RotateBody)
check_keys_query: Callable[[Any], Any] = validator(KeysQuery)
check_usage_query: Callable[[Any], Any] = validator(UsageQuery)
