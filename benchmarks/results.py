"""Benchmark figures on disk: every benchmark records what it measured with `record`, and
`make bench` ends with `python benchmarks/results.py`, which writes benchmarks/results.md (every
figure, its goal and whether it is met, the machine it ran on, the date and the commit).

    record("validation", "GX validation of 1M rows / hand-written pandas", 1.21, "x", "at most 1.4", True)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDED = HERE / ".results.jsonl"  # this `make bench`'s figures (emptied at its start)
MARKDOWN = HERE / "results.md"


def record(bench: str, measure: str, figure: float, unit: str, goal: str, met: bool | None) -> None:
    """Append one figure (met: None when the measure has no goal of its own, only context)."""
    with RECORDED.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"bench": bench, "measure": measure, "figure": figure, "unit": unit,
                                 "goal": goal, "met": met, "at": time.time()}) + "\n")


def machine() -> str:
    """Cores, CPU model and memory of this machine, as a person would name it."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {model}, {memory_gib:.0f} GiB, {platform.system()} {platform.release()}"


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,  # noqa: S607
                            text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,  # noqa: S607
                           capture_output=True, text=True, check=False).stdout.strip()
    return (result.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit "
        f"{commit()}, on {machine()}. Each ratio compares our path with a bare baseline measured in "
        "the same run.",
        "",
        "| benchmark | measure | figure | goal | met |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        figure = f"{row['figure']:.4g} {row['unit']}".strip()
        lines.append(f"| {row['bench']} | {row['measure']} | {figure} | {row['goal'] or '-'} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = [json.loads(line) for line in RECORDED.read_text().splitlines() if line.strip()] \
        if RECORDED.exists() else []
    MARKDOWN.write_text(markdown(rows), encoding="utf-8")
    print(f"{len(rows)} figures written to {MARKDOWN}")


if __name__ == "__main__":
    main()
