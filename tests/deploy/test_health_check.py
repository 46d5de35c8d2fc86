"""deploy/health-check.sh against a real server on WS_PATH=/rt with tokens, beside a real
Prometheus: every check runs and has its line, failures are counted, the exit status says."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests.deploy.serving import server_process
from tests.helpers import free_port
from tests.observability.prometheus import running_prometheus

ROOT = Path(__file__).resolve().parents[2]
HEALTH_CHECK = ROOT / "deploy/health-check.sh"


def health_check(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HEALTH_CHECK), "--env-file", str(env_file), "--python", sys.executable, *args],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_every_check_runs_on_a_custom_ws_path(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    settings = {
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "WS_PATH": "/rt",
        "METRICS_PORT": str(metrics_port),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'rt.db'}",
        "JWT_SECRET_KEY": secrets.token_hex(32),
    }
    env_file = tmp_path / "env"
    env_file.write_text("".join(f'{key}="{value}"\n' for key, value in settings.items()))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **settings}
    command = [sys.executable, "-m", "chefia_rt", "serve"]
    with server_process(command, tmp_path, env, port):
        healthy = await asyncio.to_thread(health_check, env_file)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        lines = healthy.stdout.splitlines()
        assert [line.split(":")[0] for line in lines[:4]] == [
            "ok health",
            "ok stats",
            "ok monitor",
            "ok websocket",
        ], healthy.stdout
        assert "auth=jwt" in lines[0] and "WebSocket path /rt" in lines[2]
        assert lines[4].startswith("healthy: 4 checks passed")

        # Prometheus (real, scraping the metrics port) and Grafana when their URLs are given;
        # nothing listens where Grafana is said to be: that one check fails, the others run.
        grafana = f"http://127.0.0.1:{free_port()}"
        async with running_prometheus(tmp_path, [f"127.0.0.1:{metrics_port}"]) as prometheus:
            with env_file.open("a") as extra:
                extra.write(f"PROMETHEUS_URL={prometheus.url}\nGRAFANA_URL={grafana}\n")
            checked = await asyncio.to_thread(health_check, env_file)
        print(checked.stdout, checked.stderr)
        assert checked.returncode == 1
        assert f"ok prometheus: {prometheus.url} ready, " in checked.stdout
        assert checked.stdout.count("\nok ") == 4  # health ... prometheus (5 lines, 4 after one)
        assert f"FAIL grafana: {grafana}/api/health unreachable" in checked.stderr
        assert checked.stderr.strip().splitlines()[-1].startswith("UNHEALTHY: 1 of 6 checks")

        # The wrong WS_PATH (the server serves /rt): the WebSocket and monitor checks fail,
        # health and stats still pass and say so.
        wrong = tmp_path / "wrong-env"
        wrong.write_text(env_file.read_text().replace('WS_PATH="/rt"', 'WS_PATH="/ws"'))
        wrong.write_text(wrong.read_text().replace(f"GRAFANA_URL={grafana}\n", ""))
        wrong.write_text(wrong.read_text().replace(f"PROMETHEUS_URL={prometheus.url}\n", ""))
        mismatch = await asyncio.to_thread(health_check, wrong)
        assert mismatch.returncode == 1
        assert mismatch.stdout.startswith("ok health:") and "\nok stats:" in mismatch.stdout
        assert "FAIL monitor: HTTP 200, not the Terminal Monitor page for WS_PATH=/ws" in (
            mismatch.stderr
        )
        assert "FAIL websocket: ws://127.0.0.1:" in mismatch.stderr
        assert "UNHEALTHY: 2 of 4 checks failed" in mismatch.stderr

    # Nothing listens: every check still runs and fails with its own line.
    down = await asyncio.to_thread(health_check, env_file, "--timeout", "5")
    assert down.returncode == 1
    for name in ("health", "stats", "monitor", "websocket", "prometheus", "grafana"):
        assert f"FAIL {name}: " in down.stderr, down.stderr
    assert "UNHEALTHY: 6 of 6 checks failed" in down.stderr
