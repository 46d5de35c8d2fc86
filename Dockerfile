# chefia-rt in a container: the same server as under systemd, configured by the environment.
#   docker build -t chefia-rt .
#   docker run -p 8001:8001 -e JWT_SECRET_KEY=... chefia-rt
# docker-compose.yml runs it with PostgreSQL, Redis and nginx.

# Build the virtualenv in a throwaway stage, exactly as uv.lock pins it (the uv that installs it
# comes from the lock too, hash-checked): the final image holds no build tools or sources.
FROM python:3.11-slim AS build
WORKDIR /src
COPY uv.lock ./
COPY scripts/lock_pin.py ./scripts/
RUN python scripts/lock_pin.py uv >/tmp/uv.txt \
    && pip install --no-cache-dir --root-user-action=ignore --require-hashes -r /tmp/uv.txt
COPY pyproject.toml README.md ./
COPY chefia_rt ./chefia_rt
ENV UV_PROJECT_ENVIRONMENT=/opt/chefia-rt \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv sync --locked --no-dev --no-editable --no-cache

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A dedicated user without a login: the server never needs root (port 8001 is unprivileged).
RUN groupadd --system chefia \
    && useradd --system --gid chefia --home-dir /var/lib/chefia-rt --create-home \
       --shell /usr/sbin/nologin chefia
COPY --from=build /opt/chefia-rt /opt/chefia-rt
ENV PATH=/opt/chefia-rt/bin:$PATH
# The SQLite file and BACKUP_DIR are relative to here; mount a volume to keep them.
WORKDIR /var/lib/chefia-rt
VOLUME ["/var/lib/chefia-rt"]
USER chefia
EXPOSE 8001
# /health answers 503 when storage is down or the server drains; urlopen raises on it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WS_PORT', '8001'), timeout=4)"]
# SIGTERM drains (commit what is queued, close terminals with 1001) within 25 s: give it 30 s
# (docker stop -t 30, stop_grace_period in compose).
STOPSIGNAL SIGTERM
CMD ["chefia-rt", "serve"]
