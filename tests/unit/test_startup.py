"""Start-up time: the command line and ``import asynckarton`` load only what they use.

aiobotocore, botocore and aiohttp (the S3 stack) take longer to import than the rest of
the package, and fakeredis is only for the embedded mode.  ``status``, ``list`` and
``version`` use none of them, so they must not be imported until something builds an S3
storage or an embedded runtime.  Each check runs in a fresh interpreter and reads its
``sys.modules``: a module imported by an earlier test in this process would hide the
regression.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import asynckarton
from asynckarton import Config, ConfigError, Runtime
from asynckarton._services._runtime import open_backend
from tests.servers import RedisServer

#: Top-level packages the light paths must not import.
HEAVY = {"aiobotocore", "botocore", "aiohttp", "yarl", "fakeredis"}
#: ...nor, before a command draws a table, rich.
HEAVY_UNTIL_DRAWN = HEAVY | {"rich"}

#: Runs ``asynckarton <argv...>`` in this interpreter, then writes the names of the
#: imported top-level packages as JSON to the file named by the first argument.
CLI_THEN_MODULES = """
import json, sys
from asynckarton.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    main(argv)
except SystemExit as exit:
    if exit.code:
        raise
with open(out, "w") as f:
    json.dump(sorted({name.partition(".")[0] for name in sys.modules}), f)
"""


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python args...`` with this checkout's asynckarton first on the path."""
    root = str(Path(asynckarton.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    for name in list(env):
        if name.startswith("KARTON_"):  # a developer's settings must not pick the mode
            del env[name]
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def imported_by(statement: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    return {name.partition(".")[0] for name in json.loads(result.stdout.splitlines()[-1])}


@pytest.mark.parametrize("module", ["asynckarton", "asynckarton.cli._app", "asynckarton.storage"])
def test_importing_loads_neither_the_s3_stack_nor_fakeredis(module: str) -> None:
    loaded = imported_by(f"import {module}")
    assert "asynckarton" in loaded
    heavy = loaded & HEAVY_UNTIL_DRAWN
    assert heavy == set(), f"import {module} loads {sorted(heavy)}"


def test_s3storage_is_imported_on_first_use_and_behaves_as_a_plain_export() -> None:
    code = """
import pickle, sys
import asynckarton.storage as storage
assert "aiobotocore" not in sys.modules and "S3Storage" not in vars(storage)
assert "S3Storage" in storage.__all__ and "S3Storage" in dir(storage)
from asynckarton.storage import S3Storage
from asynckarton.storage._s3 import S3Storage as defined
assert S3Storage is defined is storage.S3Storage
assert {"aiobotocore", "botocore"} <= set(sys.modules)
assert vars(storage)["S3Storage"] is S3Storage  # cached: the hook runs once
assert pickle.loads(pickle.dumps(S3Storage)) is S3Storage
try:
    storage.NoSuchThing
except AttributeError as error:
    assert "asynckarton.storage" in str(error) and "NoSuchThing" in str(error), error
else:
    raise AssertionError("storage.NoSuchThing did not raise")
print("ok")
"""
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def run_cli(tmp_path: Path, *argv: str) -> tuple[str, set[str]]:
    """Run ``asynckarton argv...`` in a fresh interpreter: (its output, packages imported)."""
    out = tmp_path / "modules.json"
    result = run_python("-c", CLI_THEN_MODULES, str(out), *argv)
    assert result.returncode == 0, result.stderr
    return result.stdout, set(json.loads(out.read_text()))


def redis_only_ini(tmp_path: Path, server: RedisServer) -> Path:
    ini = tmp_path / "karton.ini"
    ini.write_text(f"[redis]\nhost = 127.0.0.1\nport = {server.port}\n")
    return ini


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["list", "--json"]])
def test_status_and_list_against_redis_load_no_s3_client(
    tmp_path: Path, redis_srv: RedisServer, redis_url: str, command: list[str]
) -> None:
    # No [s3] section at all: these commands read Redis only, so they need none.
    ini = redis_only_ini(tmp_path, redis_srv)
    output, loaded = run_cli(tmp_path, *command, "--config-file", str(ini))
    assert loaded & HEAVY == set(), f"asynckarton {' '.join(command)} loads {loaded & HEAVY}"
    if "--json" in command:
        assert "rich" not in loaded
    if command == ["status", "--json"]:
        assert json.loads(output)["routers"] == []
    elif command == ["list", "--json"]:
        assert output.strip() == ""  # no binds registered
    else:
        assert "queues" in output and "routers" in output


def test_version_loads_no_s3_stack(tmp_path: Path) -> None:
    output, loaded = run_cli(tmp_path, "version")
    assert output.startswith(f"asynckarton {asynckarton.__version__} ")
    assert loaded & HEAVY_UNTIL_DRAWN == set()


def test_a_server_runtime_still_builds_its_s3_storage(tmp_path: Path) -> None:
    ini = tmp_path / "karton.ini"
    ini.write_text(
        "[redis]\nhost = 127.0.0.1\nport = 1\n"
        "[s3]\naddress = http://127.0.0.1:1\naccess_key = a\nsecret_key = b\nbucket = x\n"
    )
    runtime = Runtime.from_config(Config(ini, environ={}, search_paths=[]))
    from asynckarton.storage import S3Storage

    assert isinstance(runtime._storage, S3Storage)
    assert runtime.bucket == "x"


@pytest.mark.anyio
async def test_open_backend_reads_redis_and_refuses_the_embedded_mode(
    tmp_path: Path, redis_srv: RedisServer, redis_url: str
) -> None:
    config = Config(redis_only_ini(tmp_path, redis_srv), environ={}, search_paths=[])
    async with open_backend(config) as backend:
        await backend.ping()  # raises unless it reached the server
    embedded = Config(None, environ={}, search_paths=[])
    assert embedded.embedded
    with pytest.raises(ConfigError, match="no Redis server configured"):
        async with open_backend(embedded):
            pass
