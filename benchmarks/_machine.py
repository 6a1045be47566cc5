"""The machine a benchmark ran on, for the results tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a results file whole or not at all (temporary file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def machine() -> str:
    """CPU model, usable cores, RAM and OS, e.g. ``"2 cores, 24 GiB RAM, AMD EPYC, Linux"``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} cores, {mem:.0f} GiB RAM, {cpu}, {platform.system()}"


def markdown_table(df) -> str:
    """A DataFrame as a Markdown table (floats to 3 decimals, large ones whole; NaN blank).

    Written here rather than with ``DataFrame.to_markdown``, which needs the optional
    ``tabulate`` package.
    """
    import math

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
