"""``spotlens report OUT``: the HTML report of a finished run's output folder.

Reads what ``deconvolve``/``demo`` (``spatial.h5ad``, ``cells.h5ad``) or ``histology
predict`` (``predicted.h5ad``) wrote, and the run's manifest, and writes ``OUT/report.html``
through :func:`spotlens.pl.report` (atomically). The manifest is left as it is: the report is a
view of the run, not part of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from .._keys import proportions_key
from .._validation import InputError
from ._common import QuietOption, errors, log_to_stderr

logger = logging.getLogger("spotlens")

#: Result files a report is made from, in the order they are looked for.
RESULT_FILES = ("spatial.h5ad", "predicted.h5ad")
MANIFEST = "spotlens_run.json"


def report_command(
    folder: Annotated[Path, typer.Argument(
        metavar="OUT", show_default=False,
        help="Output folder of 'spotlens deconvolve', 'demo' or 'histology predict'.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", show_default=False,
        help="The HTML file to write [default: OUT/report.html].")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", "-i", metavar="IMAGE", show_default=False,
        help="Full-resolution tissue image (the coordinates' pixels) for a sharper zoom "
             "[default: the image stored in the results, if any].")] = None,
    genes: Annotated[str | None, typer.Option(
        metavar="G1,G2,...", show_default=False,
        help="Predicted genes to show [default: the --max-genes varying most].")] = None,
    max_genes: Annotated[int, typer.Option(
        min=1, help="Most predicted genes shown without --genes.")] = 24,
    max_image_side: Annotated[int, typer.Option(
        min=256, metavar="PX", help="Longest side of the embedded image.")] = 4096,
    tiles: Annotated[str, typer.Option(
        metavar="auto|embed|folder",
        help="Where the image's tiles go: in the page (reduced to --max-image-side), or at "
             "full resolution in a folder beside it (<report stem>_files/); 'auto': the "
             "folder for an image larger than --max-image-side.")] = "auto",
    quiet: QuietOption = False,
) -> None:
    """Write OUT/report.html: the results over the tissue, to open in a browser.

    One self-contained file (no server, no network): the tissue image as a zoomable pyramid,
    a layer per cell type's proportion, the dominant type, the placed cells (with
    OUT/cells.h5ad), the predicted genes and their uncertainty, the QC flags, a legend, a
    read-out of the spot under the pointer, and the run's parameters.

    Example: spotlens report demo_output   (then open demo_output/report.html)
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        import anndata as ad

        from ..pl import report

        folder = folder.expanduser()
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder; pass the output folder of a spotlens "
                             "run (-o of deconvolve, demo or histology predict).")
        found = [folder / name for name in RESULT_FILES if (folder / name).is_file()]
        if not found:
            raise InputError(f"{folder} holds no spotlens results ({' or '.join(RESULT_FILES)});"
                             " run spotlens deconvolve or histology predict with -o first.")
        adata = ad.read_h5ad(found[0])
        cells = ad.read_h5ad(folder / "cells.h5ad") if (folder / "cells.h5ad").is_file() \
            else None
        chosen = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
        target = output.expanduser() if output is not None else folder / "report.html"
        report(adata, target, key=proportions_key(), cells=cells, image=image, genes=chosen,
               max_genes=max_genes, max_image_side=max_image_side, tiles=tiles,
               run=_facts(folder),
               title=f"spotlens report — {folder.resolve().name}")
        typer.echo(f"wrote {target}")


def _facts(folder: Path) -> dict:
    """Return the command and inputs of the run, from its manifest (empty without one)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict):
        return {}
    facts = {"command": manifest.get("command"), "complete": manifest.get("complete")}
    for name, entry in (manifest.get("inputs") or {}).items():
        if isinstance(entry, dict):
            facts[f"input: {name}"] = entry.get("path") or entry.get("dataset")
    return {k: v for k, v in facts.items() if v is not None}
