"""``[karton] gc_threshold``: the collector thresholds ``asynckarton run`` sets."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynckarton import Config, ConfigError
from asynckarton._services._run import AUTO_GC_GEN0, gc_thresholds, tune_gc


def _config(**environ: str) -> Config:
    return Config(environ=environ, search_paths=[])


@pytest.fixture
def thresholds() -> Iterator[None]:
    """Restore this process's thresholds after a test that changes them."""
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def test_auto_raises_only_the_first_generation(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    assert gc_thresholds(_config()) == (AUTO_GC_GEN0, 10, 10)
    assert gc_thresholds(None) == (AUTO_GC_GEN0, 10, 10)
    assert tune_gc(_config()) == (AUTO_GC_GEN0, 10, 10)
    assert gc.get_threshold() == (AUTO_GC_GEN0, 10, 10)


def test_auto_keeps_a_larger_first_generation(thresholds: None) -> None:
    gc.set_threshold(50_000, 20, 5)
    assert gc_thresholds(_config()) is None
    assert tune_gc(_config()) == (50_000, 20, 5)


def test_python_keeps_the_interpreter_thresholds(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    assert tune_gc(_config(KARTON_KARTON_GC_THRESHOLD="Python")) == (700, 10, 10)


def test_explicit_thresholds_are_passed_on(thresholds: None) -> None:
    gc.set_threshold(700, 10, 10)
    assert tune_gc(_config(KARTON_KARTON_GC_THRESHOLD=" 2000, 20 ")) == (2000, 20, 10)
    assert gc_thresholds(_config(KARTON_KARTON_GC_THRESHOLD="0")) == (0,)


@pytest.mark.parametrize("value", ["fast", "-5", "1,2,3,4", "1.5", "10000,,10", ""])
def test_a_bad_value_names_the_option_the_value_and_where_it_came_from(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        gc_thresholds(_config(KARTON_KARTON_GC_THRESHOLD=value))
    text = str(caught.value)
    assert "[karton] gc_threshold" in text
    assert repr(value) in text
    assert "KARTON_KARTON_GC_THRESHOLD" in text


SERVE = """
import gc
import anyio
from asynckarton import Config
from asynckarton._services._run import serve_forever

class Probe:
    identity = "probe.gc"
    config = Config(search_paths=[])
    async def __aenter__(self): return self
    async def __aexit__(self, *exc): return None
    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED):
        task_status.started()
        print("threshold:", gc.get_threshold(), flush=True)
    def stop(self, *, grace=None): pass

serve_forever([Probe()], log_level="WARNING")
"""


def _interpreter_default() -> tuple[int, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", "import gc; print(*gc.get_threshold())"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    first, second, third = (int(part) for part in out.split())
    return first, second, third


@pytest.mark.parametrize("setting", [None, "python", "5000,5"])
def test_served_services_run_with_the_configured_thresholds(
    tmp_path: Path, setting: str | None
) -> None:
    """A real ``serve_forever`` process, against a fresh interpreter's thresholds."""
    default = _interpreter_default()
    expected = {
        None: (max(default[0], AUTO_GC_GEN0), *default[1:]),
        "python": default,
        "5000,5": (5000, 5, default[2]),
    }[setting]
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    if setting is not None:
        env["KARTON_KARTON_GC_THRESHOLD"] = setting
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"threshold: {expected}" in done.stdout
