"""``[karton] event_loop``: which loop ``asynckarton run`` and ``Service.main()`` use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asynckarton import Config, ConfigError
from asynckarton._services._run import event_loop_options


def _config(**environ: str) -> Config:
    """A config of ``environ`` only (no ini file is searched)."""
    return Config(environ=environ, search_paths=[])


def test_auto_is_the_default_and_picks_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert event_loop_options(_config()) == {"use_uvloop": True}
    assert event_loop_options(None) == {"use_uvloop": True}


def test_asyncio_keeps_the_standard_loop() -> None:
    config = _config(KARTON_KARTON_EVENT_LOOP="asyncio")
    assert event_loop_options(config) == {}
    config.set("karton", "event_loop", " UVLOOP ")
    assert event_loop_options(config) == {"use_uvloop": True}


def test_an_unknown_loop_names_the_option_the_value_and_where_it_came_from() -> None:
    config = _config(KARTON_KARTON_EVENT_LOOP="trio")
    with pytest.raises(ConfigError) as caught:
        event_loop_options(config)
    text = str(caught.value)
    assert "[karton] event_loop" in text
    assert "'trio'" in text
    assert "KARTON_KARTON_EVENT_LOOP" in text


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert event_loop_options(_config()) == {}
    config = _config(KARTON_KARTON_EVENT_LOOP="uvloop")
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        event_loop_options(config)


SERVE = """
import asyncio, sys
import anyio
from asynckarton import Config
from asynckarton._services._run import serve_forever

class Probe:
    identity = "probe.loop"
    config = Config(environ={"KARTON_KARTON_EVENT_LOOP": sys.argv[1]}, search_paths=[])
    async def __aenter__(self): return self
    async def __aexit__(self, *exc): return None
    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED):
        task_status.started()
        print("loop:", type(asyncio.get_running_loop()).__module__, flush=True)
    def stop(self, *, grace=None): pass

serve_forever([Probe()], log_level="WARNING")
"""


@pytest.mark.parametrize(
    ("setting", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_served_services_run_on_the_configured_loop(
    tmp_path: Path, setting: str, module: str
) -> None:
    pytest.importorskip("uvloop")
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SERVE), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), setting],
        check=False, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"loop: {module}" in done.stdout
