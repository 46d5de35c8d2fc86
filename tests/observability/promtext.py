"""Reading the Prometheus text format in tests, and promtool on a real scrape."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.services import service_missing

Sample = tuple[str, frozenset[tuple[str, str]], float]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a plain GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def scrape(url: str) -> str:
    """GET a /metrics URL; its text (failing on anything but 200 text/plain)."""
    status, headers, body = await asyncio.to_thread(http_get, url)
    assert status == 200, (status, body[:300])
    assert headers["Content-Type"].startswith("text/plain"), headers
    return body.decode()


def samples(text: str) -> list[Sample]:
    """Every sample of an exposition as (name, labels, value)."""
    return [
        (s.name, frozenset(s.labels.items()), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for n, lbls, v in samples(text) if n == name and wanted <= lbls)


def label_sets(text: str, name: str) -> list[dict[str, str]]:
    return [dict(lbls) for n, lbls, _ in samples(text) if n == name]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        service_missing("promtool", "not installed (apt install prometheus)")
    assert path is not None
    return path


def promtool_check_metrics(text: str) -> None:
    """`promtool check metrics` must accept the exposition: no format error, no lint problem."""
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
