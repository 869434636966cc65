"""examples/deployment/launch.py --smoke: the whole deployment comes up, works and stops.

Real processes: redis-server, moto's S3 server (SeaweedFS is the launcher's default; moto
keeps this test light), ``asynckarton system`` with metrics, two services, a log tail.
karton-dashboard is optional in the example and not started here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import require

pytestmark = [pytest.mark.integration]

LAUNCHER = Path(__file__).resolve().parents[2] / "examples" / "deployment" / "launch.py"


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_the_smoke_run_routes_processes_and_reports(tmp_path: Path) -> None:
    require("redis-server")
    work = tmp_path / "deployment"
    done = subprocess.run(
        [sys.executable, str(LAUNCHER), "--smoke", "--s3", "moto", "--free-ports",
         "--count", "3", "--workdir", str(work)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke run passed" in done.stdout

    metrics = (work / "metrics.txt").read_text()
    replicas = samples(metrics, "karton_replicas")
    assert replicas[(("name", "example_reporter"), ("version", "1.0.0"))] == 1
    assert replicas[(("name", "example_uppercase"), ("version", "1.0.0"))] == 1
    counters = samples(metrics, "karton_metrics")
    assert counters[(("metric", "consumed"), ("name", "example_reporter"))] == 3
    assert counters[(("metric", "consumed"), ("name", "example_uppercase"))] == 3
    assert samples(metrics, "asynckarton_routed_tasks_total")[()] == 6

    status = json.loads((work / "status.json").read_text())
    assert {"example.uppercase", "example.reporter"} <= set(json.dumps(status).split('"'))

    tail = [json.loads(line) for line in (work / "logs" / "logs.log").read_text().splitlines()
            if line.startswith("{")]  # fmt: skip
    assert sum(r["message"].startswith("received 'HELLO FROM TASK") for r in tail) == 3
    assert sum("Processing task" in r["message"] for r in tail) == 6
    system_console = (work / "logs" / "system.log").read_text()
    assert system_console.count("Processing task") == 6
