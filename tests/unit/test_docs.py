"""The documents the code cites exist, and docs/wire-format.md names every Redis key.

* No file of the repository cites a reference document that is not in it (the design
  notes the code once cited by name are not shipped; ``docs/`` replaces them).
* Every ``docs/...`` path a file mentions, and every relative link of a Markdown file,
  points at a file that exists (and, with ``#anchor``, at one of its headings).
* Every key name and key pattern ``asynckarton/backend/_keys.py`` defines appears in
  ``docs/wire-format.md``.
* docs/capacity.md is linked from the README and docs/architecture.md, and quotes the
  figures of the last ``python -m benchmarks.capacity`` run (benchmarks/CAPACITY.md).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynckarton.backend import _keys

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".ini", ".cfg", ".yml", ".yaml", ".rst", ""}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
# Built from parts so that this file does not cite them itself.
MISSING_DOCUMENTS = tuple(name + ".md" for name in ("karton", "decisions", "style"))
CITATION = re.compile(
    r"(?<![\w.-])(" + "|".join(re.escape(name) for name in MISSING_DOCUMENTS) + r")\b"
)
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w(?:#[\w-]+)?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def repo_text_files() -> Iterator[Path]:
    """Every text file of the repository (sources, tests, docs, config, scripts)."""
    for path in sorted(REPO.rglob("*")):
        relative = path.relative_to(REPO)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in relative.parts):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            yield path


def read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(markdown: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in read(markdown).splitlines()
        if re.match(r"#{1,6}\s", line)
    }


def broken_target(target: str, base: Path) -> str | None:
    """Describe what is wrong with link ``target`` (relative to ``base``), or None."""
    path_part, _, anchor = target.partition("#")
    file = (base / path_part).resolve() if path_part else None
    if file is not None and not file.exists():
        return "no such file"
    if anchor and file is not None and file.suffix == ".md" and anchor not in anchors(file):
        return f"no heading with anchor #{anchor}"
    return None


def test_no_file_cites_a_document_that_is_not_in_the_repository() -> None:
    found = [
        f"{path.relative_to(REPO)}:{number}: {match.group(1)}"
        for path in repo_text_files()
        for number, line in enumerate(read(path).splitlines(), 1)
        for match in CITATION.finditer(line)
        if not any(p.name == match.group(1) for p in REPO.rglob(match.group(1)))
    ]
    assert found == []


def test_every_docs_path_mentioned_exists() -> None:
    broken = [
        f"{path.relative_to(REPO)}:{number}: {match.group(0)} ({problem})"
        for path in repo_text_files()
        for number, line in enumerate(read(path).splitlines(), 1)
        for match in DOCS_PATH.finditer(line)
        if (problem := broken_target(match.group(0), REPO)) is not None
    ]
    assert broken == []


def test_relative_markdown_links_resolve() -> None:
    markdown = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    broken = [
        f"{path.relative_to(REPO)}: ({match.group(1)}) {problem}"
        for path in markdown
        for match in MARKDOWN_LINK.finditer(read(path))
        if "://" not in match.group(1)
        if (problem := broken_target(match.group(1), path.parent)) is not None
    ]
    assert broken == []


def test_the_three_documents_exist() -> None:
    for name in ("architecture.md", "wire-format.md", "guarantees.md"):
        assert (DOCS / name).is_file(), name


def key_names() -> list[str]:
    """Every key name and pattern ``_keys.py`` defines, patterns with ``<param>`` holes."""
    names: list[str] = []
    for attr, value in vars(_keys).items():
        if attr.isupper() and isinstance(value, str):
            names.append(value)
        elif inspect.isfunction(value) and value.__module__ == _keys.__name__:
            params = inspect.signature(value).parameters
            made = value(*(f"<{p}>" for p in params))
            names.extend(made if isinstance(made, list) else [made])
    return names


@pytest.mark.parametrize("name", key_names())
def test_wire_format_names_every_key(name: str) -> None:
    assert f"`{name}" in read(DOCS / "wire-format.md"), f"{name} is not in docs/wire-format.md"


def test_key_names_are_found() -> None:
    names = key_names()
    assert "karton.binds" in names
    assert "asynckarton.leases:<identity>" in names
    assert "karton.queue.<priority>:<identity>" in names


#: Figures of benchmarks/CAPACITY.md that docs/capacity.md must quote as measured.
CAPACITY_FIGURES = (
    r"single Redis saturates at: ([\d,]+) deliveries/s",
    r"with one GC pass per delivery added to Redis's CPU: ([\d,]+) deliveries/s",
    r"Redis CPU per delivery \(fastest step\): ([\d.]+) us",
    r"Redis network per delivery \(fastest step\): in ([\d,]+) B",
    r"Redis memory per delivery kept until the next GC pass: ([\d,]+) B",
)


def test_capacity_model_is_linked() -> None:
    assert (DOCS / "capacity.md").is_file()
    assert "](docs/capacity.md)" in read(REPO / "README.md")
    assert "](capacity.md)" in read(DOCS / "architecture.md")


@pytest.mark.parametrize("pattern", CAPACITY_FIGURES)
def test_capacity_model_quotes_the_measured_figures(pattern: str) -> None:
    measured = re.search(pattern, read(REPO / "benchmarks" / "CAPACITY.md"))
    assert measured is not None, f"benchmarks/CAPACITY.md has no figure for {pattern!r}"
    figure = measured.group(1)
    assert figure in read(DOCS / "capacity.md"), (
        f"docs/capacity.md does not quote {figure} (benchmarks/CAPACITY.md: {measured.group(0)})"
    )
