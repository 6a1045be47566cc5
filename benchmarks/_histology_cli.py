"""``python benchmarks/histology_her2st.py --cli``: the README's commands against the protocol.

Runs, in ``../shared/data/her2st``, exactly the README's two commands

    spotlens histology train --sections C2.h5ad C3.h5ad C4.h5ad C5.h5ad --tile-um 100 -o MODEL
    spotlens histology evaluate --model MODEL --sections C6.h5ad B4.h5ad -o EVAL

(plus ``--cache-dir`` for the encoder's features, which changes no number, and a temporary
MODEL and EVAL), then checks each held-out section's mean r against the protocol's row of the
default route (``benchmarks/results/histology_her2st_protocol.csv``: her2st, HVG-50, the
route's features and standardisation, model "selected"). Writes
``benchmarks/results/histology_her2st_cli.md``; exits 1 if they differ by more than
``--tolerance``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _histology import DATA, HERE, machine_line
from _machine import write_atomic

README_TRAIN = ("spotlens histology train --sections C2.h5ad C3.h5ad C4.h5ad C5.h5ad "
                "--tile-um 100 -o MODEL")
README_EVALUATE = "spotlens histology evaluate --model MODEL --sections C6.h5ad B4.h5ad -o EVAL"


def _spotlens() -> str:
    """The ``spotlens`` command of this Python's environment."""
    here = Path(sys.executable).parent / "spotlens"
    return str(here) if here.exists() else "spotlens"


def _run(command: str, *, cwd: Path, model: Path, evaluation: Path, cache_dir, log) -> float:
    args = shlex.split(command.replace("MODEL", str(model)).replace("EVAL", str(evaluation)))
    args[0] = _spotlens()
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    log("$ " + " ".join(args))
    t0 = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(HERE / ".cache"))
    parser.add_argument("--protocol", default=str(HERE / "results" /
                                                  "histology_her2st_protocol.csv"))
    parser.add_argument("--tolerance", type=float, default=5e-4)
    parser.add_argument("--out", default=str(HERE / "results" / "histology_her2st_cli.md"))
    args = parser.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    scores = pd.read_csv(args.protocol)
    expected = scores.query("dataset == 'her2st' and gene_set == 'hvg' and model == 'selected' "
                            "and route").set_index("section")
    features, std = expected["features"].iloc[0], expected["standardization"].iloc[0]
    folder = DATA / "her2st"
    with tempfile.TemporaryDirectory() as tmp:
        model, evaluation = Path(tmp) / "MODEL", Path(tmp) / "EVAL"
        kw = {"cwd": folder, "model": model, "evaluation": evaluation,
              "cache_dir": args.cache_dir, "log": log}
        train_s = _run(README_TRAIN, **kw)
        eval_s = _run(README_EVALUATE, **kw)
        table = pd.read_csv(evaluation / "evaluation.csv", index_col=0)
        config = (model / "config.json").read_text()
    rows, ok = [], True
    for section, row in expected.iterrows():
        cli_r = float(table.loc[section, "mean_pearson"])
        diff = cli_r - float(row["r"])
        ok &= abs(diff) <= args.tolerance
        rows.append(f"| {section} | {cli_r:.4f} | {row['r']:.4f} [{row['low']:.3f}, "
                    f"{row['high']:.3f}] | {diff:+.1e} | {row['chosen']} |")
    import json

    settings = json.loads(config)
    lines = [
        "# The README's CLI commands reproduce the protocol's default route (issue 15)", "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine_line()}",
        "- command: `python benchmarks/histology_her2st.py --cli`",
        "- runs, in the her2st data folder, `" + README_TRAIN + "` and `" + README_EVALUATE
        + "` (each with `--cache-dir` for the encoder features, which changes no number), "
        f"then compares with `{Path(args.protocol).name}` (her2st, HVG-50, {features}, "
        f"{std} standardisation, model 'selected').",
        f"- the trained model: model type `{settings['model_type']}`, genes "
        f"`{settings['gene_rule']}` ({len(settings['genes'])}), tile scales "
        f"{settings['tiles']['scales']}, standardize `{settings['tiles']['standardize']}`, "
        f"alpha {settings['validation'].get('alpha', float('nan')):.3g}, expression rank "
        f"{settings['validation'].get('expression_rank')}",
        f"- time: train {train_s:.0f} s, evaluate {eval_s:.0f} s",
        f"- result: {'equal' if ok else 'DIFFERENT'} (tolerance {args.tolerance:g})", "",
        "| section | CLI mean r | protocol 'selected' row [95 % CI] | difference | chosen |",
        "|---|---:|---:|---:|---|",
        *rows, "",
    ]
    out = write_atomic(args.out, "\n".join(lines))
    log("\n".join(lines))
    log(f"wrote {out}")
    return 0 if ok else 1
