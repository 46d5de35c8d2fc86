"""The deployment files, checked offline with the real tools that will read them: bash and
shellcheck for the scripts, systemd-analyze for the units, nginx -t for the site, docker-compose
for the compose file (its own compose-spec schema), and the settings loader for .env.example."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chefia_rt.config import Settings, load_settings
from tests.services import service_missing
from tests.test_backup import unit_settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    [*ROOT.glob("deploy/*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / ".ci/run"],
)
UNITS = ["chefia-rt.service", "chefia-rt-backup.service", "chefia-rt-backup.timer"]
INSTALLED_BIN = "/opt/chefia-rt/current/venv/bin/chefia-rt"


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        service_missing(name, f"not installed (apt-get install {package})")
    assert found is not None
    return found


def run(*args: str, cwd: Path = ROOT, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False, **kwargs
    )


# ---- scripts -----------------------------------------------------------------------------------


def test_every_script_is_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"deploy/deploy.sh", "deploy/health-check.sh", "scripts/test.sh", ".ci/run"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_parses_and_passes_shellcheck(script: Path) -> None:
    parsed = run("bash", "-n", str(script))
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = tool("shellcheck", "shellcheck")
    # -x follows the `source=` directives (scripts/_venv.sh), relative to the repository root.
    checked = run(shellcheck, "--shell=bash", "--external-sources", str(script.relative_to(ROOT)))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("script", ["deploy/deploy.sh", "deploy/health-check.sh"])
def test_deploy_scripts_are_strict_and_executable(script: Path) -> None:
    path = ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()
    usage = run(str(path), "--bogus")
    assert usage.returncode == 2, usage.stderr
    assert "unknown" in usage.stderr


# ---- systemd -----------------------------------------------------------------------------------


def test_service_unit_settings() -> None:
    unit = dict(unit_settings(ROOT / "deploy/chefia-rt.service"))
    assert unit["Type"] == "notify" and unit["User"] == "chefia"
    assert unit["ExecStart"] == f"{INSTALLED_BIN} serve"
    assert unit["EnvironmentFile"] == "/etc/chefia-rt/env"
    assert unit["LimitNOFILE"] == "65536" and unit["Restart"] == "on-failure"
    assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict"
    assert unit["WorkingDirectory"] in unit["ReadWritePaths"].split()
    # The supervisor drains its workers within DRAIN_TIMEOUT; systemd must wait longer.
    from chefia_rt.supervisor import DRAIN_TIMEOUT

    assert float(unit["TimeoutStopSec"]) > DRAIN_TIMEOUT
    # The backup runs as the same user, in the same place, from the same release.
    backup = dict(unit_settings(ROOT / "deploy/chefia-rt-backup.service"))
    for key in ("User", "Group", "EnvironmentFile", "WorkingDirectory", "ReadWritePaths"):
        assert backup[key] == unit[key], key
    assert backup["ExecStart"] == f"{INSTALLED_BIN} backup"


def test_units_verify_and_are_hardened(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    # `verify` wants ExecStart's binary to exist: point it at this checkout's entry point.
    script = Path(sys.executable).parent / "chefia-rt"
    for name in UNITS:
        text = (ROOT / "deploy" / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_BIN, str(script)))
    checked = run(analyze, "verify", *UNITS, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr
    security = run(analyze, "security", "--offline=true", "chefia-rt.service", cwd=tmp_path)
    exposure = re.search(r"Overall exposure level for chefia-rt.service: ([\d.]+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    print(f"systemd-analyze security exposure: {exposure.group(1)} (10 = unprotected)")
    # Debian's default units score 9+; every option above keeps this one low.
    assert float(exposure.group(1)) <= 3.0, security.stdout


# ---- sysctl ------------------------------------------------------------------------------------


def test_sysctl_file_names_real_keys_each_with_a_reason() -> None:
    lines = (ROOT / "deploy/sysctl.d/60-chefia-rt.conf").read_text().splitlines()
    keys = []
    for index, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9_.-]+) = (\S+( \S+)*)", line)
        assert match, f"not `key = value`: {line!r}"
        keys.append(match.group(1))
        # A why-comment directly above each setting or its group.
        above = next(lines[i] for i in range(index - 1, -1, -1) if not re.match(r"[a-z]", lines[i]))
        assert above.startswith("#"), f"{match.group(1)} has no comment above it"
        # A typo would only show as an error of `sysctl --system` on the server.
        assert Path("/proc/sys", *match.group(1).split(".")).exists(), match.group(1)
    assert {"net.core.somaxconn", "net.ipv4.tcp_migrate_req", "fs.file-max"} <= set(keys)


# ---- nginx -------------------------------------------------------------------------------------


def nginx_wrapper(tmp_path: Path, site: str) -> Path:
    """A throwaway nginx.conf that includes `site` with every path under tmp_path."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "site.conf").write_text(site)
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/logs/error.log;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    access_log {tmp_path}/logs/access.log;
    include {tmp_path}/site.conf;
}}
"""
    )
    return conf


def self_signed(tmp_path: Path) -> Path:
    openssl = tool("openssl", "openssl")
    tls = tmp_path / "tls"
    tls.mkdir()
    made = run(
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", str(tls / "privkey.pem"), "-out", str(tls / "fullchain.pem"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return tls


def site_for_test(tmp_path: Path, tls: Path) -> str:
    site = (ROOT / "deploy/nginx/chefia-rt.conf").read_text()
    assert "/etc/chefia-rt/tls/" in site and "/var/log/nginx/" in site
    return site.replace("/etc/chefia-rt/tls", str(tls)).replace(
        "/var/log/nginx", str(tmp_path / "logs")
    )


def test_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx", "nginx")
    tls = self_signed(tmp_path)
    conf = nginx_wrapper(tmp_path, site_for_test(tmp_path, tls))
    checked = run(nginx, "-t", "-p", str(tmp_path), "-c", str(conf))
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr


def test_nginx_site_shape() -> None:
    site = (ROOT / "deploy/nginx/chefia-rt.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in site.splitlines())
    ws = re.search(r"location /ws/ \{(.*?)\n    \}", code, re.S)
    assert ws and "limit_conn chefia_ws_conn" in ws.group(1)
    assert "proxy_read_timeout 1h" in ws.group(1)
    for private in ("= /metrics", "= /ws/metrics"):
        block = re.search(rf"location {re.escape(private)} \{{(.*?)\}}", code, re.S)
        assert block and "deny all;" in block.group(1), private
    assert "return 301 https://" in code and "ssl_certificate " in code
    assert "$request_uri;" not in code.replace("return 301 https://$host$request_uri;", "")


# ---- containers --------------------------------------------------------------------------------


def test_compose_file_is_valid(tmp_path: Path) -> None:
    # The compose plugin of `docker` is not installed here and needs no daemon for `config`;
    # Debian's docker-compose validates against its bundled compose-spec schema, offline.
    compose = tool("docker-compose", "docker-compose (--no-install-recommends)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JWT_SECRET_KEY": "0" * 64}
    checked = run(compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q", env=env)
    assert checked.returncode == 0, checked.stderr
    # Without a key it refuses to start rather than run in open mode.
    env.pop("JWT_SECRET_KEY")
    refused = run(compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q", env=env)
    assert refused.returncode != 0 and "JWT_SECRET_KEY" in refused.stderr
    resolved = run(compose, "-f", str(ROOT / "docker-compose.yml"), "config", env=env | {
        "JWT_SECRET_KEY": "0" * 64})  # fmt: skip
    for service in ("postgres:", "redis:", "server:", "nginx:"):
        assert f"\n  {service}" in resolved.stdout, service
    assert "deploy/nginx/chefia-rt.conf" in resolved.stdout
    # Every job of the shipped Prometheus config is scraped on localhost: a service in the
    # server's network namespace listens there, as on a single host.
    prometheus = (ROOT / "config/prometheus.yml").read_text()
    jobs = dict(re.findall(r"job_name: (\S+)\n(?:.*\n)*?.*?localhost:(\d+)", prometheus))
    serving = {
        "chefia-rt": "server",
        "postgres": "postgres-exporter",
        "redis": "redis-exporter",
        "nginx": "nginx-exporter",
        "alertmanager": "alertmanager",
    }
    assert set(jobs) == set(serving), jobs
    services = re.split(r"\n  (?=[a-z-]+:\n)", resolved.stdout.split("services:\n", 1)[1])
    blocks = {block.split(":", 1)[0].strip(): block for block in services}
    for service in serving.values():
        if service != "server":
            assert "network_mode: service:server" in blocks[service], service
    assert "METRICS_PORT: 9101" in blocks["server"] and jobs["chefia-rt"] == "9101"
    assert "prometheus" in blocks and "alerts.yml" in blocks["prometheus"]
    assert "config/alertmanager.yml" in blocks["alertmanager"]
    # The backup service runs the schedule the systemd timer would.
    assert "- --schedule" in blocks["backup"] and "BACKUP_SCHEDULE: 0 2 * * *" in blocks["backup"]


def dockerfile_instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def test_every_install_comes_from_the_current_lock() -> None:
    """uv.lock agrees with pyproject.toml, and each way of installing reads it (hash-checked)."""
    uv = Path(sys.executable).parent / "uv"
    checked = run(str(uv), "lock", "--check", "--offline", "--project", str(ROOT))
    assert checked.returncode == 0, checked.stderr
    runs = [args for word, args in dockerfile_instructions(ROOT / "Dockerfile") if word == "RUN"]
    assert any("lock_pin.py uv" in r and "--require-hashes" in r for r in runs), runs
    assert any(r.startswith("uv sync --locked --no-dev") for r in runs), runs
    assert 'sync --project "$ROOT" --locked' in (ROOT / "scripts/_venv.sh").read_text()
    deploy = (ROOT / "deploy/deploy.sh").read_text()
    assert '--require-hashes -r "$dir/requirements.txt"' in deploy
    pin = run(sys.executable, str(ROOT / "scripts/lock_pin.py"), "uv")
    assert re.fullmatch(r"uv==\S+( --hash=sha256:[0-9a-f]{64})+\n", pin.stdout), pin.stdout


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    instructions = list(dockerfile_instructions(ROOT / "Dockerfile"))
    known = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "VOLUME", "USER", "EXPOSE", "HEALTHCHECK",
             "STOPSIGNAL", "CMD"}  # fmt: skip
    assert {word for word, _ in instructions} <= known
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    assert final_stage[0][1] == "python:3.11-slim"
    users = [args for word, args in final_stage if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    health = [args for word, args in final_stage if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0]
    assert ("CMD", '["chefia-rt", "serve"]') in final_stage
    # Every COPY source exists and is not excluded by .dockerignore.
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for word, args in instructions:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


# ---- configuration -----------------------------------------------------------------------------


def test_env_example_lists_every_setting_with_its_default(tmp_path: Path) -> None:
    text = (ROOT / "config/.env.example").read_text()
    listed = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, re.M))
    names = {name.upper() for name in Settings.model_fields}
    missing = names - listed
    assert not missing, f"config/.env.example lacks {sorted(missing)}: add them with a comment"
    assert not listed - names - {"WS_WORKER_THREADS"}, sorted(listed - names)
    # Loaded as it is, it configures exactly the defaults.
    example = load_settings(_env_file=str(ROOT / "config/.env.example"))
    assert example.model_dump() == load_settings(_env_file=None).model_dump()
    # Every commented example parses too.
    for line in re.findall(r"^#([A-Z][A-Z0-9_]+=.+)$", text, re.M):
        env = tmp_path / "one.env"
        # (WS_WORKERS above 1 needs REDIS_URL.)
        env.write_text(f"REDIS_URL=redis://127.0.0.1:6379/0\n{line}\n")
        load_settings(_env_file=str(env))


def test_nginx_site_proxies_tls_websocket_and_guards_metrics(tmp_path: Path) -> None:
    """The site, run for real: TLS in front of a server, a WebSocket round trip through /ws/,
    /health through, /metrics refused to an address outside the allow list (127.0.0.2)."""
    import asyncio
    import json
    import ssl
    import urllib.error
    import urllib.request

    import websockets

    from tests.deploy.serving import server_process
    from tests.helpers import free_port

    nginx = tool("nginx", "nginx")
    tls = self_signed(tmp_path)
    upstream, https, http, status = free_port(), free_port(), free_port(), free_port()
    site = site_for_test(tmp_path, tls)
    site = site.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{status};")
    site = site.replace("server 127.0.0.1:8001", f"server 127.0.0.1:{upstream}")
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http};")
    site = re.sub(r"\n\s*listen \[::\]:\d+( ssl)?;", "", site)
    conf = nginx_wrapper(tmp_path, site)
    conf.write_text(conf.read_text().replace("events {", "daemon off;\nevents {", 1))
    env = {
        "PATH": "/usr/bin:/bin",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(upstream),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'site.db'}",
    }
    serve = [str(Path(sys.executable).parent / "chefia-rt"), "serve"]
    context = ssl.create_default_context(cafile=str(tls / "fullchain.pem"))
    with server_process(serve, tmp_path, env, upstream):
        proxy = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf)])
        try:
            base = f"https://127.0.0.1:{https}"
            deadline = 30.0
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/health", context=context, timeout=2) as r:
                        assert json.loads(r.read())["status"] == "ok"
                        break
                except OSError:
                    assert proxy.poll() is None, (tmp_path / "logs/error.log").read_text()
                    deadline -= 0.2
                    assert deadline > 0, "nginx did not proxy /health within 30 s"
                    subprocess.run(["sleep", "0.2"], check=True)

            # Plain http redirects to https.
            redirect = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                 f"http://127.0.0.1:{http}/monitor"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert redirect.stdout.startswith("301 https://"), redirect.stdout

            async def round_trip() -> dict[str, object]:
                url = f"wss://127.0.0.1:{https}/ws/pos-nginx?store_id=s1"
                async with websockets.connect(url, ssl=context, open_timeout=10) as ws:
                    hello = json.loads(await ws.recv())
                    assert hello["type"] == "connection_established"
                    await ws.send(json.dumps({"type": "ping", "timestamp": 7}))
                    while True:
                        message: dict[str, object] = json.loads(await ws.recv())
                        if message["type"] == "pong":
                            return message

            assert asyncio.run(asyncio.wait_for(round_trip(), 30))["timestamp"] == 7

            # /metrics: allowed from 127.0.0.1 (reaches the server), refused from 127.0.0.2.
            denied = subprocess.run(
                ["curl", "-sk", "--interface", "127.0.0.2", "-o", "/dev/null", "-w",
                 "%{http_code}", f"{base}/metrics"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert denied.stdout == "403", denied.stdout + denied.stderr
            allowed = subprocess.run(
                ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/metrics"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert allowed.stdout != "403", allowed.stdout
            # What the nginx exporter reads.
            with urllib.request.urlopen(f"http://127.0.0.1:{status}/stub_status", timeout=5) as r:
                assert r.read().startswith(b"Active connections: ")
            log = (tmp_path / "logs/chefia-rt.access.log").read_text()
            assert 'GET /ws/pos-nginx HTTP/1.1" 101' in log, log
            assert "store_id" not in log  # $uri only: no query string (tokens) in the log
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)
