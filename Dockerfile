# nettel container image: one image, every role (`nettel up|ingest|stream|detect|mcp ...`).
#
#   docker build -t nettel:latest .
#   docker run --rm nettel:latest --help
#
# Runs as the unprivileged user `nettel` (uid 10001). The ingest role is the one
# exception: docker-compose.kafka.yml runs it as uid 0 with every capability dropped but
# SYS_PTRACE (reading other processes' /proc/<pid>/ns/net; the reason is there).
#
# The base image is pinned to an exact version. Pin its digest too on a host that can pull
# (README, "Run on a Docker host"):
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: resolve the locked dependencies into a self-contained venv ----------------
FROM ${PYTHON_IMAGE} AS build
# uv from PyPI, pinned; it installs exactly what uv.lock says
RUN pip install --no-cache-dir --disable-pip-version-check "uv==0.13.9"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/nettel
WORKDIR /src
# dependencies first (cached while only our code changes); --locked fails if uv.lock
# is out of date with pyproject.toml, --no-dev leaves the test tools out
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY src ./src
RUN uv sync --locked --no-dev --no-editable

# ---- runtime: the venv on a clean base, no build tools ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="nettel" \
      org.opencontainers.image.description="Container network telemetry and anomaly detection" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 nettel \
    && useradd --system --uid 10001 --gid nettel --home-dir /home/nettel --create-home \
       --shell /usr/sbin/nologin nettel \
    && mkdir -p /data \
    && chown nettel:nettel /data
COPY --from=build /opt/nettel /opt/nettel
# /data: the tables (a named volume in compose; ownership comes from this dir);
# JSON logs to stderr: a container has no terminal; matplotlib's cache on /tmp, since
# compose runs every role with a read-only root filesystem
ENV PATH=/opt/nettel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NETTEL_DATA_DIR=/data \
    NETTEL_LOG_FORMAT=json
WORKDIR /home/nettel
USER 10001:10001
# doctor exits 1 when the broker does not answer or the data dir is not writable
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["nettel", "doctor"]
ENTRYPOINT ["nettel"]
CMD ["up"]
