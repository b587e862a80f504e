# syntax=docker/dockerfile:1
# HelixAgent container image.  Two stages: `build` makes the project's wheel (and wheels of its dependencies);
# the final stage installs only those runtime wheels -- no compiler, no pip cache, no test extras.
#   docker build -t helixagent:latest .
#   docker run --rm helixagent:latest migrate up
#   docker run -p 7061:7061 -e HELIXAGENT_API_KEY=... helixagent:latest          (CMD: serve --host 0.0.0.0)

FROM python:3.11-slim AS build
# HELIX_COMPILE=1: the hot modules are compiled into the wheel with mypyc (setup.py; README, "Compiled hot
# modules"), which needs a C compiler here -- only here: the runtime stage installs the built wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HELIX_COMPILE=1
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md setup.py ./
COPY scripts/build ./scripts/build
COPY src ./src
# the project's wheel plus a wheel of every runtime dependency (no [test] extra)
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="helixagent" \
      org.opencontainers.image.description="HelixAgent LLM gateway (OpenAI, Anthropic and Gemini APIs)"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# install from the wheels only (--no-index: nothing is fetched or built here), then drop them
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/helixagent-*.whl \
    && groupadd --system --gid 10001 helixagent \
    && useradd --system --uid 10001 --gid helixagent --home-dir /var/lib/helixagent --shell /usr/sbin/nologin helixagent \
    && mkdir -p /var/lib/helixagent/spool /etc/helixagent \
    && chown -R helixagent:helixagent /var/lib/helixagent
# the built-in defaults keep the SQLite database (./helixagent.db) and the spool (./spool) in the working
# directory: /var/lib/helixagent, the one writable place (mount a volume there).  A config file is given by
# HELIXAGENT_CONFIG (e.g. mounted at /etc/helixagent/helixagent.yaml).
WORKDIR /var/lib/helixagent
VOLUME ["/var/lib/helixagent"]
USER 10001:10001
EXPOSE 7061
# the seed's health check (interval 30s, timeout 10s, 3 retries, 40s start period); slim has no curl
HEALTHCHECK --interval=30s --timeout=10s --start-period=40s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7061/health', timeout=8).status == 200 else 1)"]
ENTRYPOINT ["helixagent"]
CMD ["serve", "--host", "0.0.0.0"]
