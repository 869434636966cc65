"""``python -m asynckarton demo`` as a real process: the whole pipeline, embedded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from asynckarton.demo import sample_files

pytestmark = pytest.mark.integration


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARTON_")}
    env["HOME"] = str(tmp_path)  # no ~/.config/karton/karton.ini
    return subprocess.run(
        [sys.executable, "-m", "asynckarton", "demo", *args],
        cwd=tmp_path,  # no ./karton.ini
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_reports_every_shipped_sample(tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for sample in sample_files():
        assert f"\n{sample.name}  (" in out, sample.name
    assert out.count("karton.demo.classifier") == len(sample_files())
    assert "ELF 64-bit (x86-64) -> kind=runnable platform=linux" in out
    assert "PE exe (i386) -> kind=runnable platform=win32" in out
    assert "ZIP archive -> kind=archive" in out
    # the strings extractor ran on both executables and found their strings
    assert out.count("karton.demo.strings") == 2
    assert "'Hello from the asynckarton demo ELF!'" in out
    assert "'GetProcAddress'" in out
    assert f"{len(sample_files())}/{len(sample_files())} file(s) fully reported" in out


def test_demo_with_an_explicit_file(tmp_path: Path) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Title (quarterly numbers) >> endobj\n%%EOF\n")
    result = run_demo(tmp_path, str(pdf), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert "report.pdf  (" in result.stdout
    assert "PDF document -> kind=document extension=pdf" in result.stdout
    assert "karton.demo.strings" not in result.stdout  # not an executable
    assert "1/1 file(s) fully reported" in result.stdout


def test_demo_missing_file_is_an_error(tmp_path: Path) -> None:
    result = run_demo(tmp_path, str(tmp_path / "missing.bin"))
    assert result.returncode == 1
    assert "no such file" in result.stderr


@pytest.mark.parametrize(("level", "allowed"), [("ERROR", ()), ("INFO", ("INFO", "WARNING"))])
def test_demo_log_level_reaches_the_services(
    tmp_path: Path, level: str, allowed: tuple[str, ...]
) -> None:
    result = run_demo(tmp_path, "--log-level", level)
    assert result.returncode == 0, result.stderr
    levels = {
        line.split("][")[1].split("]")[0] for line in result.stderr.splitlines() if "][" in line
    }
    assert levels <= set(allowed), result.stderr
    if level == "INFO":  # the services' own lines do appear at INFO
        assert "INFO" in levels
