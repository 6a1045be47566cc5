"""Run competing deconvolution methods ("peers"), each in its own venv, from the spotlens venv.

Each peer has a runner ``run_<peer>.py`` beside this file, executed by that peer's venv python
(``${SPOTLENS_PEERS_HOME:-~/.cache/spotlens/peers}/<peer>/venv``, made by ``setup.sh``) as::

    python run_<peer>.py --spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR

which writes ``DIR/proportions.csv`` (spots × cell types, NaN rows for dropped spots) and
``DIR/run.json`` (seconds, peak_memory_mb, spots_dropped, types_dropped, version, notes).

Example::

    import sys; sys.path.insert(0, "benchmarks/peers")
    import peers
    res = peers.run_peer("flashdeconv", "st.h5ad", "ref.h5ad", "out/flashdeconv")
    res["proportions"], res["run"]["seconds"], res["error"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
PEERS: tuple[str, ...] = ("nnls", "flashdeconv", "rctd", "tangram", "cell2location")


def peers_home() -> Path:
    """``$SPOTLENS_PEERS_HOME`` or ``~/.cache/spotlens/peers``."""
    return Path(os.environ.get("SPOTLENS_PEERS_HOME", Path.home() / ".cache/spotlens/peers"))


def _check(peer: str) -> None:
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")


def python_for(peer: str) -> Path:
    """The python that runs ``peer``: its venv's, or for ``nnls`` without a venv this one."""
    _check(peer)
    venv = peers_home() / peer / "venv"
    if peer == "nnls" and not (venv / ".installed").exists():
        return Path(sys.executable)  # numpy, scipy, pandas and anndata are all it needs
    return venv / "bin" / "python"


def available(peer: str) -> bool:
    """Whether ``peer``'s venv was installed completely (and, for rctd, its table exists)."""
    _check(peer)
    if peer == "nnls" and python_for(peer) == Path(sys.executable):
        return True
    ok = (peers_home() / peer / "venv" / ".installed").exists()
    if peer == "rctd":
        table = os.environ.get("RCTD_Q_MATRICES", peers_home() / "rctd" / "q_matrices.npz")
        ok = ok and Path(table).exists()
    return ok


def run_peer(peer: str, spatial_path: str | os.PathLike, reference_path: str | os.PathLike,
             out_dir: str | os.PathLike, labels_key: str = "cell_type",
             timeout: float | None = 3600, seed: int = 0) -> dict:
    """Run one peer in a subprocess and read back what it wrote.

    Returns a dict with ``peer``; ``proportions`` (DataFrame, spots × types, or None);
    ``run`` (the run.json contents, or {}); ``error`` (None, or a string: not installed,
    timeout, non-zero exit with the tail of stderr, or missing outputs); ``wall_seconds``
    (of the whole subprocess, imports and file reading included). Stale outputs in
    ``out_dir`` are removed first so a failed run can never be read as a result.
    The subprocess's stdout/stderr are kept in ``out_dir/log.txt``.
    """
    _check(peer)
    out = Path(out_dir).resolve()
    spatial_path, reference_path = Path(spatial_path).resolve(), Path(reference_path).resolve()
    result: dict = {"peer": peer, "proportions": None, "run": {}, "error": None,
                    "wall_seconds": None}
    if not available(peer):
        result["error"] = f"{peer} not installed (run benchmarks/peers/setup.sh {peer})"
        return result
    out.mkdir(parents=True, exist_ok=True)
    for name in ("proportions.csv", "run.json"):
        (out / name).unlink(missing_ok=True)
    cmd = [str(python_for(peer)), str(HERE / f"run_{peer}.py"), "--spatial", str(spatial_path),
           "--reference", str(reference_path), "--labels-key", labels_key, "--out", str(out),
           "--seed", str(seed)]
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=HERE)
        except subprocess.TimeoutExpired:
            result["error"] = f"timeout after {timeout} s"
            return result
    result["wall_seconds"] = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-5:]
        result["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
        return result
    try:
        result["proportions"] = pd.read_csv(out / "proportions.csv", index_col=0)
        result["run"] = json.loads((out / "run.json").read_text())
    except (OSError, ValueError) as exc:
        result["error"] = f"outputs unreadable: {exc}"
    return result
