"""The Files and Batches APIs (OpenAI) and Message Batches (Anthropic): run at the vendor's batch API
(native mode) or by the gateway's own durable runner (local mode).  See docs/batches.md; the parts:
store.py (tables), jsonl.py (input validation), multipart.py (uploads), openai_api.py / anthropic_api.py
(the HTTP APIs), execute.py (one line through the pipeline), runner.py (the runner), native.py (vendor
batches)."""
