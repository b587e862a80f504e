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

# Files and batches of the OpenAI Files/Batches and Anthropic Message Batches APIs; revision 0006_batches.
# Tenant-scoped like ``responses`` (a key sees only its own); every body blob is encrypted with the record
# keyring when encryption is on (associated data: the row's id -- ``<batch id>:<line>`` for a line -- and
# the column), ``enc_key_id`` naming the key.
batch_files = sa.Table(
    "batch_files", metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("tenant", sa.String(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("purpose", sa.String(), nullable=False),            # batch | batch_output
    sa.Column("filename", sa.String(), nullable=False),
    sa.Column("bytes", sa.Integer(), nullable=False),
    sa.Column("batch_id", sa.String(), nullable=True),            # the batch an output/error file belongs to
    sa.Column("content", sa.LargeBinary(), nullable=False),
    sa.Column("enc_key_id", sa.String(), nullable=True),
    sa.Index("ix_batch_files_tenant", "tenant", "created_at"),
)

batches = sa.Table(
    "batches", metadata,
    sa.Column("id", sa.String(), primary_key=True),
    sa.Column("tenant", sa.String(), nullable=False),
    sa.Column("api", sa.String(), nullable=False),                # openai | anthropic
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("endpoint", sa.String(), nullable=False),
    sa.Column("input_file_id", sa.String(), nullable=True),
    sa.Column("completion_window", sa.String(), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(), nullable=False),
    sa.Column("metadata", sa.Text(), nullable=True),              # JSON
    sa.Column("errors", sa.Text(), nullable=True),                # JSON list (validation failures)
    # the owner whose identity every line runs with (re-checked against the key store at run time)
    sa.Column("key_id", sa.String(), nullable=True),
    sa.Column("user_id", sa.String(), nullable=True),
    sa.Column("application", sa.String(), nullable=True),
    sa.Column("role", sa.String(), nullable=False),
    sa.Column("ip", sa.String(), nullable=True),                  # the creator's address: its lines' IP limits
    sa.Column("total", sa.Integer(), nullable=False),
    sa.Column("output_file_id", sa.String(), nullable=True),
    sa.Column("error_file_id", sa.String(), nullable=True),
    sa.Column("in_progress_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finalizing_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("cancelling_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),  # Anthropic: deleted by its owner
    # native mode: the batch runs at the vendor (batches/native.py); the lease makes one instance poll at a time
    sa.Column("mode", sa.String(), nullable=False, server_default="local"),
    sa.Column("provider", sa.String(), nullable=True),
    sa.Column("upstream_id", sa.String(), nullable=True),
    sa.Column("upstream_status", sa.String(), nullable=True),
    sa.Column("upstream_cancelled", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("lease_owner", sa.String(), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_batches_tenant", "tenant", "created_at"),
    sa.Index("ix_batches_status", "status"),
)

# One row per input line.  state: pending -> running (claimed: lease_owner, lease_until) -> succeeded |
# errored; or cancelled / expired.  A running line whose lease has run out is claimed again (its instance
# died); the result is written only by the lease's holder (fenced), so every line has exactly one result.
batch_lines = sa.Table(
    "batch_lines", metadata,
    sa.Column("batch_id", sa.String(), primary_key=True),
    sa.Column("idx", sa.Integer(), primary_key=True),
    sa.Column("custom_id", sa.String(), nullable=False),
    sa.Column("state", sa.String(), nullable=False),
    sa.Column("lease_owner", sa.String(), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("gen", sa.Integer(), nullable=False, server_default="0"),  # +1 per release: a new request id
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("result", sa.LargeBinary(), nullable=True),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("request_id", sa.String(), nullable=True),
    sa.Column("input_tokens", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("enc_key_id", sa.String(), nullable=True),
    sa.Index("ix_batch_lines_claim", "batch_id", "state"),
)
