"""Summarise py-spy raw stacks (``--profile DIR``): top functions by self and total time.

``python -m benchmarks.profile_summary DIR/plain.asynckarton.consumer.*.txt [--top 25]``

Only the main thread's samples after start-up count: stacks inside an import
(``_find_and_load``) and stacks of other threads (``Thread._bootstrap``: anyio's idle
worker threads, boto's pools) are reported as totals and left out of the tables.  Samples
whose leaf is the event loop's ``select`` are the idle time.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/pkg/module.py:12)`` -> ``func (pkg/module.py)``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    parts = match["file"].split("/")
    return f"{match['func']} ({'/'.join(parts[-2:])})"


def summarise(paths: list[Path], top: int) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    samples = idle = startup = threads = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_short(f) for f in stack.split(";") if f.strip()]
            if not frames:
                continue
            if any(f.startswith("Thread._bootstrap (") for f in frames):
                threads += count
                continue
            if any(f.startswith("_find_and_load (") for f in frames):
                startup += count
                continue
            samples += count
            leaf = frames[-1]
            if "selectors.py" in leaf:
                idle += count
            self_time[leaf] += count
            for frame in set(frames):
                total_time[frame] += count
    out = [
        (
            f"{len(paths)} file(s): {samples} main-thread samples after start-up, "
            f"{idle / max(samples, 1):.0%} of them idle in the selector "
            f"(left out: {startup} import-time and {threads} other-thread samples)"
        )
    ]
    for title, counter in (("self", self_time), ("total (inclusive)", total_time)):
        out.append(f"\ntop {top} by {title}:")
        for frame, count in counter.most_common(top):
            out.append(f"  {count / max(samples, 1):6.1%}  {frame}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.paths, args.top))


if __name__ == "__main__":
    main()
