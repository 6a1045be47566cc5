"""The ``spotlens`` command: parse arguments, call the public API, write outputs. Nothing else."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from .._backend import BackendError
from .._validation import InputError

logger = logging.getLogger("spotlens")

EXIT_INPUT = 2
EXIT_FAILURE = 1
PROPORTIONS_KEY = "proportions_spotlens"

app = typer.Typer(
    name="spotlens",
    help=(
        "Cell-type deconvolution of spatial transcriptomics with an attention-weighted spatial "
        "graph.\n\n"
        "Each command writes OUT/spatial.h5ad (input plus results), OUT/proportions.csv "
        "(spots × cell types, rows sum to 1) and OUT/proportions.png (one map per cell type)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain, compact help that reads well in 80 columns
)


def _penalty(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"expected a number ≥ 0 or 'auto', got {value!r}.") from None
    if not number >= 0 or number == float("inf"):
        raise typer.BadParameter(f"expected a number ≥ 0 or 'auto', got {value!r}.")
    return number


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"spotlens {__version__}")
        raise typer.Exit()


OutOption = Annotated[
    Path,
    typer.Option("--out", "-o", metavar="DIR", show_default=False,
                 help="Output folder (created if missing; files in it are replaced)."),
]
DeviceOption = Annotated[
    str,
    typer.Option(help="'cpu' (NumPy), 'torch' (torch on CPU), 'cuda', 'cuda:N', or 'auto' "
                      "(CUDA if available)."),
]
SeedOption = Annotated[int, typer.Option(help="Seed for count splitting, PCA, cell states and graph colouring.")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress",
                                              help="Show a progress bar.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q",
                                           help="Log warnings only, not each stage.")]


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


@app.command("deconvolve", no_args_is_help=True,
             short_help="Estimate the cell-type proportions of each spot from a reference.")
def deconvolve_command(
    spatial: Annotated[Path, typer.Option(
        "--spatial", "-s", show_default=False, metavar="PATH",
        help="Spatial data: .h5ad with raw counts and obsm coordinates, or a Space Ranger outs/ "
             "folder.")],
    reference: Annotated[Path, typer.Option(
        "--reference", "-r", show_default=False, metavar="H5AD",
        help="Single-cell reference .h5ad with raw counts and cell-type labels in obs.")],
    out: OutOption,
    labels_key: Annotated[str, typer.Option(help="Reference obs column with cell types.")] = (
        "cell_type"
    ),
    layer: Annotated[str | None, typer.Option(
        help="Layer of the spatial data with raw counts [default: X].", show_default=False)] = None,
    reference_layer: Annotated[str | None, typer.Option(
        help="Layer of the reference with raw counts [default: X].", show_default=False)] = None,
    spatial_key: Annotated[str, typer.Option(
        help="obsm key of the spot coordinates (n_spots × 2).")] = "spatial",
    library_key: Annotated[str | None, typer.Option(
        help="obs column naming the section of each spot; sections are never linked "
             "[default: one section].", show_default=False)] = None,
    k_neighbors: Annotated[int, typer.Option(min=1, help="Neighbours per spot in the graph.")] = 6,
    lambda_ridge: Annotated[str, typer.Option(
        parser=_penalty, metavar="FLOAT|auto",
        help="Ridge penalty (relative, unit-free), or 'auto' for cross-validation.")] = "auto",
    lambda_spatial: Annotated[str, typer.Option(
        parser=_penalty, metavar="FLOAT|auto",
        help="Spatial smoothing penalty (relative, unit-free), or 'auto' for "
             "cross-validation.")] = "auto",
    attention: Annotated[bool, typer.Option(
        "--attention/--no-attention",
        help="Weight graph edges by expression similarity; --no-attention uses distance only.")
    ] = True,
    device: DeviceOption = "cpu",
    seed: SeedOption = 0,
    n_iter: Annotated[int, typer.Option(min=1, help="Maximum solver sweeps.")] = 200,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Estimate the cell-type proportions of every spot from a single-cell reference.

    Reads the spatial data and the reference, runs spotlens.deconv.deconvolve and writes
    OUT/spatial.h5ad, OUT/proportions.csv and OUT/proportions.png. Bad input prints
    "error: ..." and exits with code 2.

    Example: spotlens deconvolve -s sample/outs -r ref.h5ad -o results
    """
    with _logging(quiet), _errors():
        from ..deconv import deconvolve
        from ..io import read_reference, read_spatial

        _check_device(device)
        out = _out_dir(out)
        logger.info("reading spatial data %s", spatial)
        st = read_spatial(spatial, spatial_key=spatial_key)
        logger.info("reading reference %s", reference)
        ref = read_reference(reference, labels_key=labels_key)
        deconvolve(
            st, ref, labels_key=labels_key, layer=layer, reference_layer=reference_layer,
            spatial_key=spatial_key, library_key=library_key, k_neighbors=k_neighbors,
            lambda_ridge=lambda_ridge, lambda_spatial=lambda_spatial, use_attention=attention,
            device=device, seed=seed, n_iter=n_iter, key_added=PROPORTIONS_KEY, inplace=True,
            progress=progress,
        )
        _write_outputs(st, out, spatial_key=spatial_key)


@app.command("demo", short_help="Run the bundled example and score it against the truth.")
def demo_command(
    out: OutOption,
    device: DeviceOption = "cpu",
    seed: SeedOption = 0,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Run on the bundled osmFISH cortex example and score the result against the truth.

    Writes the same three files as 'deconvolve' and prints Pearson r, RMSE and mean
    Jensen–Shannon divergence against the known proportions.

    Example: spotlens demo -o demo_output
    """
    with _logging(quiet), _errors():
        from .._metrics import accuracy
        from ..deconv import deconvolve

        _check_device(device)
        try:
            from ..datasets import osmfish_cortex
        except ImportError as err:
            typer.echo(f"error: the bundled example is not available ({err}).", err=True)
            raise typer.Exit(EXIT_FAILURE) from None
        out = _out_dir(out)
        logger.info("loading the bundled osmFISH cortex example")
        st, ref = osmfish_cortex()
        deconvolve(st, ref, labels_key="cell_type", device=device, seed=seed,
                   key_added=PROPORTIONS_KEY, inplace=True, progress=progress)
        _write_outputs(st, out, spatial_key="spatial")
        scores = accuracy(st.obsm[PROPORTIONS_KEY], st.obsm["true_proportions"])
        typer.echo(_accuracy_table(scores))


def main(argv: list[str] | None = None) -> None:
    """Run the ``spotlens`` command line (the console-script entry point).

    Parameters
    ----------
    argv
        Arguments without the program name; ``None`` reads ``sys.argv``.
    """
    app(args=argv, prog_name="spotlens")


def _accuracy_table(scores: dict) -> str:
    rows = [
        ("Pearson r", f"{scores['pearson_r']:.3f}", "all spot × type entries; 1 is perfect"),
        ("RMSE", f"{scores['rmse']:.3f}", "proportion units; 0 is perfect"),
        ("mean JSD", f"{scores['mean_jsd']:.3f}", "Jensen–Shannon divergence per spot, base 2; "
                                                   "0 is perfect"),
    ]
    lines = [f"accuracy against the true proportions ({scores['n_spots']} spots × "
             f"{scores['n_types']} cell types):"]
    lines += [f"  {name:<10} {value:>6}   ({note})" for name, value, note in rows]
    return "\n".join(lines)


def _write_outputs(st, out: Path, *, spatial_key: str) -> None:
    from ..io import save_figure, write_csv, write_h5ad
    from ..pl import proportions

    logger.info("writing %s", out)
    paths = {name: out / name for name in ("spatial.h5ad", "proportions.csv", "proportions.png")}
    write_h5ad(st, paths["spatial.h5ad"])
    table = st.obsm[PROPORTIONS_KEY].copy()
    table.index.name = "spot"
    write_csv(table, paths["proportions.csv"])
    fig = proportions(st, key=PROPORTIONS_KEY, spatial_key=spatial_key)
    save_figure(fig, paths["proportions.png"])
    for path in paths.values():
        typer.echo(f"wrote {path}")


def _check_device(device: str) -> None:
    from .._backend import resolve_device

    try:
        resolve_device(device)
    except ValueError as err:  # an unknown device string
        raise InputError(str(err)) from err


def _out_dir(out: Path) -> Path:
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {out} is a file; pass a folder with -o.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"Cannot create the output folder {out} ({err.strerror}).") from err
    return out


@contextmanager
def _errors() -> Iterator[None]:
    """Turn bad input into a one-line message and exit code 2; a failed read/write into code 1."""
    try:
        yield
    except (InputError, BackendError) as err:
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(EXIT_INPUT) from None
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        typer.echo(f"error: {where}{err.strerror or err}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return text.replace(" ", f" {record.levelname.lower()}: ", 1)
        return text


@contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    """Print the ``spotlens`` logger's records to the current stderr while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    before = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]
