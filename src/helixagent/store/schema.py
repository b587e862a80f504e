"""The ``completions`` table (SQLAlchemy Core).  Alembic's revision 0001_completions creates it."""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

completions = sa.Table(
    "completions", metadata,
    # HelixAgent's own id (x-helixagent-request-id; x-request-id too unless the client sent one);
    # never the client's nor the provider's id.
    sa.Column("request_id", sa.String(), primary_key=True),
    sa.Column("client_request_id", sa.String(), nullable=True),   # the client's X-Request-ID, if any
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user_id", sa.String(), nullable=True),
    sa.Column("application", sa.String(), nullable=True),
    sa.Column("key_id", sa.String(), nullable=True),
    sa.Column("provider", sa.String(), nullable=True),
    sa.Column("model", sa.String(), nullable=True),
    sa.Column("endpoint", sa.String(), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("error_type", sa.String(), nullable=True),
    sa.Column("prompt_tokens", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("total_tokens", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("cost", sa.Numeric(20, 10, asdecimal=False), nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Float(), nullable=True),
    sa.Column("ttft_ms", sa.Float(), nullable=True),
    sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("streamed", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("request_body", sa.LargeBinary(), nullable=True),
    sa.Column("response_body", sa.LargeBinary(), nullable=True),
    sa.Column("enc_key_id", sa.String(), nullable=True),   # NULL: bodies stored in the clear
    # how the response ended (pipeline.OUTCOMES: completed, error, upstream_error, client_gone, shutdown,
    # response_failed); NULL in rows written before revision 0003
    sa.Column("outcome", sa.String(), nullable=True),
    # the ensemble request this record belongs to (its parent's request id; the parent's own id on the
    # parent); NULL for every other record (revision 0005_completions_ensemble)
    sa.Column("ensemble_id", sa.String(), nullable=True),
    sa.Index("ix_completions_created_at", "created_at"),
    sa.Index("ix_completions_user_id", "user_id", "created_at"),
    sa.Index("ix_completions_application", "application", "created_at"),
    sa.Index("ix_completions_provider", "provider", "created_at"),
    sa.Index("ix_completions_key_id", "key_id", "created_at"),
    sa.Index("ix_completions_ensemble_id", "ensemble_id"),
)

# Column order of a record as the request path journals it (bodies travel separately).  New columns are
# appended: a frame journaled by an older version (shorter) is padded with NULLs on replay.
META_COLUMNS = (
    "request_id", "client_request_id", "created_at", "user_id", "application", "key_id", "provider", "model",
    "endpoint", "status", "error_type", "prompt_tokens", "completion_tokens", "total_tokens", "cost",
    "latency_ms", "ttft_ms", "cache_hit", "streamed", "enc_key_id", "outcome", "ensemble_id",
)

# Stored responses of the Responses API (/v1/responses with ``store`` not false); revision 0004_responses.
# ``tenant`` is who created it (``k:<key id>``, ``u:<user>``, or empty for the master key / an open
# gateway): another tenant's lookup finds nothing.  The blobs are AES-256-GCM like record bodies when
# encryption is on (associated data: the id and the column), with ``enc_key_id`` naming the key.
responses = sa.Table(
    "responses", metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("tenant", sa.String(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("request_id", sa.String(), nullable=True),      # the completion record of this response
    sa.Column("provider", sa.String(), nullable=True),
    sa.Column("model", sa.String(), nullable=True),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("native", sa.Boolean(), nullable=False, server_default=sa.false()),  # stored by OpenAI too
    sa.Column("previous_response_id", sa.String(), nullable=True),
    sa.Column("history", sa.LargeBinary(), nullable=True),      # the conversation before this turn (items)
    sa.Column("input_items", sa.LargeBinary(), nullable=False),  # this turn's input items
    sa.Column("response", sa.LargeBinary(), nullable=False),     # the response object
    sa.Column("enc_key_id", sa.String(), nullable=True),
    sa.Index("ix_responses_tenant", "tenant", "created_at"),
)
