"""The ``spotlens`` command: parse arguments, call the public API, write outputs. Nothing else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .._keys import cell_counts_key, cell_weights_key, proportions_key
from .._validation import InputError, check_cells_per_spot, check_cells_per_spot_mode
from ._common import (
    EXIT_FAILURE,
    DeviceOption,
    OutOption,
    ProgressOption,
    QuietOption,
    SeedOption,
    SettingsFileError,
    check_device,
    errors,
    log_to_stderr,
)
from ._outputs import OverwriteOption, output_folder

logger = logging.getLogger("spotlens")

PROPORTIONS_KEY = proportions_key()
CELL_WEIGHTS_KEY = cell_weights_key()
CELL_COUNTS_KEY = cell_counts_key(CELL_WEIGHTS_KEY)
#: Every file 'deconvolve' and 'demo' write (besides the manifest); without a manifest, any of
#: them in the output folder marks an earlier run's results.
OUTPUTS = ("spatial.h5ad", "proportions.csv", "proportions.png", "cells.h5ad", "cells.png",
           "report.html")

app = typer.Typer(
    name="spotlens",
    help=(
        "Cell-type deconvolution of spatial transcriptomics with an attention-weighted spatial "
        "graph.\n\n"
        "Each command writes OUT/spatial.h5ad (input plus results), OUT/proportions.csv "
        "(spots × cell types, rows sum to 1) and OUT/proportions.png (one map per cell type); "
        "with --cell-level also OUT/cells.h5ad (reference cells placed in the spots) and "
        "OUT/cells.png (their map); with --report OUT/report.html, a page to open in a browser "
        "(also 'spotlens report OUT'). OUT/spotlens_run.json, written last, records the "
        "version, inputs, options and files of the run, with \"complete\": true once it has "
        "finished. A folder with another run's results is refused unless --overwrite."
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


#: Flag (parameter) name → setting name, where they differ.
_FLAG_SETTINGS = {"attention": "use_attention"}


def _settings(ctx: typer.Context, path: Path | None, **flags):
    """The deconvolution and cell-level settings: ``--config`` file, then the flags given on
    the command line (a flag left at its default does not override the file)."""
    from ..deconv import CellLevelConfig, DeconvolutionConfig

    def given(name: str) -> bool:
        flag = next((f for f, setting in _FLAG_SETTINGS.items() if setting == name), name)
        return getattr(ctx.get_parameter_source(flag), "name", None) == "COMMANDLINE"

    cell_flags = {"n_candidates": flags.pop("n_candidates")}
    if path is None:
        cell = {k: v for k, v in cell_flags.items() if v is not None}
        config = DeconvolutionConfig.from_dict(flags)
        return config, CellLevelConfig.from_dict({**cell, "seed": config.seed})
    try:  # names in the file's messages stay the file's names, not flags
        from_file = DeconvolutionConfig.from_file(path)
        # the cell level follows the run's seed unless the file's cell_level table sets one
        cell = CellLevelConfig.from_file(path, seed=from_file.seed).to_dict()
    except InputError as err:
        raise SettingsFileError(f"--config {path}: {err}") from None
    config = from_file.updated(**{name: value for name, value in flags.items() if given(name)})
    cell.update({k: v for k, v in cell_flags.items() if v is not None and given(k)})
    if given("seed"):
        cell["seed"] = config.seed
    return config, CellLevelConfig.from_dict(cell)


def _genes_per_type(value: str) -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise typer.BadParameter(f"expected a positive integer or 'all', got {value!r}.")
    return number


def _likelihood(value: str) -> str:
    if value not in ("auto", "quasi_poisson", "poisson", "gaussian"):
        raise typer.BadParameter(
            f"expected 'auto', 'quasi_poisson', 'poisson' or 'gaussian', got {value!r}."
        )
    return value


def _version(value: bool) -> None:
    if value:
        from .._version import __version__

        typer.echo(f"spotlens {__version__}")
        raise typer.Exit()


CellLevelOption = Annotated[bool, typer.Option(
    "--cell-level",
    help="After the proportions, weight individual reference cells in each spot "
         "(spotlens.deconv.cell_level) and place them (assign_cells): writes OUT/cells.h5ad and "
         "OUT/cells.png, and the weights into OUT/spatial.h5ad.")]


ReportOption = Annotated[bool, typer.Option(
    "--report/--no-report",
    help="Also write OUT/report.html: one self-contained page (no server, no network) with "
         "the tissue, the proportions, the dominant type, the placed cells and the QC; open "
         "it in a browser.")]


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


@app.command("deconvolve", no_args_is_help=True,
             short_help="Estimate the cell-type proportions of each spot from a reference.")
def deconvolve_command(
    ctx: typer.Context,
    spatial: Annotated[Path, typer.Option(
        "--spatial", "-s", show_default=False, metavar="PATH",
        help="Spatial data: .h5ad with raw counts and obsm coordinates, a Space Ranger outs/ "
             "folder (Visium or Visium HD; for HD also a binned_outputs/square_<NNN>um/ "
             "folder), or a SpatialData .zarr store (pip install 'spotlens[spatialdata]').")],
    reference: Annotated[Path, typer.Option(
        "--reference", "-r", show_default=False, metavar="H5AD",
        help="Single-cell reference .h5ad with raw counts and cell-type labels in obs.")],
    out: OutOption,
    bin_size: Annotated[int | None, typer.Option(
        min=1, metavar="UM",
        help="Visium HD: bin size in µm to read from outs/binned_outputs/square_<NNN>um/ "
             "(e.g. 2, 8, 16) [default: 8 when present].", show_default=False)] = None,
    labels_key: Annotated[str, typer.Option(help="Reference obs column with cell types.")] = (
        "cell_type"
    ),
    layer: Annotated[str | None, typer.Option(
        help="Layer of the spatial data with raw counts; 'raw' for counts held in .raw (then "
             "OUT/spatial.h5ad holds them in X) [default: X].", show_default=False)] = None,
    reference_layer: Annotated[str | None, typer.Option(
        help="Layer of the reference with raw counts; 'raw' for counts held in .raw "
             "[default: X].", show_default=False)] = None,
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
    likelihood: Annotated[str, typer.Option(
        parser=_likelihood, metavar="auto|quasi_poisson|poisson|gaussian",
        help="Data term: 'poisson' (count likelihood), 'quasi_poisson' (the same with genes "
             "that scatter more than Poisson down-weighted), 'gaussian' (weighted least "
             "squares), or 'auto': quasi_poisson on the CPU on slides of at most 5,000 "
             "spots.")] = "auto",
    device: DeviceOption = "cpu",
    seed: SeedOption = 0,
    n_iter: Annotated[int, typer.Option(min=1, help="Maximum solver sweeps.")] = 200,
    min_cells_per_type: Annotated[int, typer.Option(
        min=1, metavar="INT",
        help="Reference cell types with fewer cells are refused (their signatures would be "
             "noise): drop or merge them, or lower this.")] = 5,
    n_genes_per_type: Annotated[str, typer.Option(
        parser=_genes_per_type, metavar="INT|all",
        help="Informative genes kept per cell type; 'all' keeps every expressed gene.")] = "200",
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="FILE",
        help="JSON or TOML file of settings, by the names of "
             "spotlens.deconv.DeconvolutionConfig (e.g. lambda_spatial = 0.1, [cv] folds = 3) "
             "and, in a [cell_level] table, of CellLevelConfig (e.g. lambda_type = 0.2); it "
             "reaches every setting, and flags given on the command line override it.",
        show_default=False)] = None,
    cell_level: CellLevelOption = False,
    cells_per_spot: Annotated[str | None, typer.Option(
        metavar="COLUMN|estimate|N",
        help="With --cell-level: how many cells a spot holds. An obs column with known counts "
             "(e.g. nuclei); 'estimate': from how far spots scatter around the fit (for "
             "assays that capture less than the reference, e.g. Visium); a number N: the mean "
             "cells per spot (prior) [default: library size over the reference cells'].",
        show_default=False)] = None,
    n_candidates: Annotated[int | None, typer.Option(
        min=1, metavar="INT",
        help="With --cell-level: candidate reference cells per cell type and spot "
             "[default: 10].", show_default=False)] = None,
    table: Annotated[str | None, typer.Option(
        metavar="NAME",
        help="SpatialData store: the table of counts to read [default: the only table, "
             "'table', or the --bin-size (8 µm) Visium HD table].", show_default=False)] = None,
    write_spatialdata: Annotated[bool, typer.Option(
        "--write-spatialdata",
        help="SpatialData input: also write the results into the store, as the table "
             "'proportions_spotlens' annotating the same shapes (and with --cell-level the "
             "points 'cells_spotlens'); with --overwrite they replace an earlier run's.")
    ] = False,
    report: ReportOption = False,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Estimate the cell-type proportions of every spot from a single-cell reference.

    Reads the spatial data and the reference, runs spotlens.deconv.deconvolve and writes
    OUT/spatial.h5ad, OUT/proportions.csv and OUT/proportions.png. With --cell-level it then
    runs spotlens.deconv.cell_level and assign_cells and also writes OUT/cells.h5ad and
    OUT/cells.png. Last comes OUT/spotlens_run.json, the record of the run. Bad input prints
    "error: ..." and exits with code 2; a folder with another run's results needs --overwrite.

    Example: spotlens deconvolve -s outs -r ref.h5ad -o out --cell-level
    Visium HD: spotlens deconvolve -s outs --bin-size 8 -r ref.h5ad -o out
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        from ..deconv import deconvolve
        from ..io import read_reference, read_spatial, read_spatialdata

        check_device(device)
        settings, cell_settings = _settings(
            ctx, config, k_neighbors=k_neighbors, lambda_ridge=lambda_ridge,
            lambda_spatial=lambda_spatial, use_attention=attention, likelihood=likelihood,
            seed=seed, n_iter=n_iter, min_cells_per_type=min_cells_per_type,
            n_genes_per_type=n_genes_per_type, n_candidates=n_candidates,
        )
        if write_spatialdata and not (spatial.suffix == ".zarr" or (spatial / "zarr.json").is_file()
                                      or (spatial / ".zgroup").is_file()):
            raise InputError(f"--write-spatialdata writes into a SpatialData store; {spatial} "
                             "is not one (.zarr).")
        if not cell_level and (cells_per_spot is not None or n_candidates is not None):
            raise InputError("--cells-per-spot and --n-candidates apply to the cell-level step; "
                             "add --cell-level.")
        with output_folder(out, known=OUTPUTS, overwrite=overwrite) as run:
            logger.info("reading spatial data %s", spatial)
            st = (read_spatial(spatial, spatial_key=spatial_key, bin_size=bin_size)
                  if table is None else
                  read_spatialdata(spatial, table_key=table, spatial_key=spatial_key))
            run.add_input("spatial", spatial, adata=st)
            st, layer = _counts_in_raw(st, layer, what="spatial data", flag="--layer")
            cells_per_spot = _cells_per_spot_arg(cells_per_spot)
            if check_cells_per_spot_mode(cells_per_spot) == "column":  # fail before the fit
                check_cells_per_spot(st, cells_per_spot)
            logger.info("reading reference %s", reference)
            ref = read_reference(reference, labels_key=labels_key)
            run.add_input("reference", reference, adata=ref)
            ref, reference_layer = _counts_in_raw(ref, reference_layer, what="reference",
                                                  flag="--reference-layer")
            deconvolve(
                st, ref, labels_key=labels_key, layer=layer, reference_layer=reference_layer,
                spatial_key=spatial_key, library_key=library_key, device=device,
                config=settings, key_added=PROPORTIONS_KEY, inplace=True, progress=progress,
            )
            cells = None
            if cell_level:
                cells = _cell_level(
                    st, ref, labels_key=labels_key, layer=layer,
                    reference_layer=reference_layer, spatial_key=spatial_key,
                    cells_per_spot=cells_per_spot, settings=cell_settings, progress=progress,
                )
            if write_spatialdata:  # first: a refused store leaves no half-written OUT
                from ..io import write_spatialdata as write_store

                write_store(st, spatial, key=PROPORTIONS_KEY, cells=cells, overwrite=overwrite)
                typer.echo(f"wrote table {PROPORTIONS_KEY!r} into {spatial}")
            _write_outputs(run, st, spatial_key=spatial_key, cells=cells, report=report)


@app.command("demo", short_help="Run the bundled example and score it against the truth.")
def demo_command(
    out: OutOption,
    device: DeviceOption = "cpu",
    seed: SeedOption = 0,
    cell_level: CellLevelOption = False,
    report: ReportOption = True,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Run on the bundled osmFISH cortex example and score the result against the truth.

    Writes the same files as 'deconvolve' (and OUT/report.html unless --no-report) and
    prints Pearson r, RMSE and mean Jensen–Shannon divergence against the known proportions.
    Every spot is made of known reference cells, so with --cell-level it also prints the
    recall of each spot's true cells among its top-weighted reference cells and the error of
    the estimated cells per type.

    Example: spotlens demo -o demo_output --cell-level
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        from ..metrics import accuracy
        from ..deconv import CellLevelConfig, deconvolve

        check_device(device)
        try:
            from ..datasets import osmfish_cortex
        except ImportError as err:
            typer.echo(f"error: the bundled example is not available ({err}).", err=True)
            raise typer.Exit(EXIT_FAILURE) from None
        with output_folder(out, known=OUTPUTS, overwrite=overwrite) as run:
            logger.info("loading the bundled osmFISH cortex example")
            st, ref = osmfish_cortex()
            run.add_input("spatial", adata=st, dataset="osmfish_cortex")
            run.add_input("reference", adata=ref, dataset="osmfish_cortex")
            deconvolve(st, ref, labels_key="cell_type", device=device, seed=seed,
                       key_added=PROPORTIONS_KEY, inplace=True, progress=progress)
            cells = None
            if cell_level:
                cells = _cell_level(st, ref, labels_key="cell_type", layer=None,
                                    reference_layer=None, spatial_key="spatial",
                                    cells_per_spot=None, settings=CellLevelConfig(seed=seed),
                                    progress=progress)
            _write_outputs(run, st, spatial_key="spatial", cells=cells, report=report)
        scores = accuracy(st.obsm[PROPORTIONS_KEY], st.obsm["true_proportions"])
        typer.echo(_accuracy_table(scores))
        if cell_level:
            from ..metrics import count_error, member_recall

            recall = member_recall(st, ref, key=CELL_WEIGHTS_KEY)
            error = count_error(st.obsm[CELL_COUNTS_KEY], st.obsm["true_cell_counts"])
            typer.echo(_cell_table(recall, error, n_types=st.obsm[CELL_COUNTS_KEY].shape[1],
                                   n_cells=ref.n_obs))


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


def _cell_table(recall: dict, error: float, *, n_types: int, n_cells: int) -> str:
    lines = [f"cell level against the true member cells ({recall['n_spots']} spots, "
             f"{n_cells} reference cells, {n_types} cell types):"]
    lines += [
        f"  {'recall':<10} {recall['recall']:>6.3f}   (spot's own n cells among its n "
        f"top-weighted; random {recall['random']:.3f})",
        f"  {'count MAE':<10} {error:>6.3f}   (cells per spot and type; 0 is perfect)",
    ]
    return "\n".join(lines)


def _cells_per_spot_arg(value: str | None) -> str | float | None:
    """``--cells-per-spot``: a number is the mean cells per spot; other text a column name."""
    if value is None or value == "estimate":
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    check_cells_per_spot_mode(number)  # a clear error for 0, negative or nan
    return number


def _cell_level(st, ref, *, labels_key: str, layer: str | None, reference_layer: str | None,
                spatial_key: str, cells_per_spot: str | float | None, settings, progress: bool):
    """Run the cell-level step (``settings``: a CellLevelConfig) into ``st``; return the cells."""
    from ..deconv import assign_cells, cell_level

    cell_level(
        st, ref, labels_key=labels_key, layer=layer, reference_layer=reference_layer,
        key=PROPORTIONS_KEY, cells_per_spot=cells_per_spot, **settings.to_dict(),
        key_added=CELL_WEIGHTS_KEY, inplace=True, progress=progress,
    )
    return assign_cells(st, ref, key=CELL_WEIGHTS_KEY, spatial_key=spatial_key,
                        reference_layer=reference_layer, seed=settings.seed)


def _write_outputs(run, st, *, spatial_key: str, cells=None, report: bool = False) -> None:
    """Write the results through ``run`` (an :class:`OutputRun`), then its complete manifest."""
    from ..io import save_figure, write_csv, write_h5ad
    from ..pl import cells as cell_map
    from ..pl import proportions

    logger.info("writing %s", run.folder)
    run.start_writing([*OUTPUTS[:3], *(OUTPUTS[3:5] if cells is not None else ()),
                       *(["report.html"] if report else [])])
    run.write("spatial.h5ad", lambda path: write_h5ad(st, path))
    table = st.obsm[PROPORTIONS_KEY].copy()
    table.index.name = "spot"
    run.write("proportions.csv", lambda path: write_csv(table, path))
    fig = proportions(st, key=PROPORTIONS_KEY, spatial_key=spatial_key)
    run.write("proportions.png", lambda path: save_figure(fig, path))
    if cells is not None:
        run.write("cells.h5ad", lambda path: write_h5ad(cells, path))
        fig = cell_map(cells, st, spatial_key=spatial_key)
        run.write("cells.png", lambda path: save_figure(fig, path))
    if report:
        from ..pl import report as write_report

        facts = {"command": run.command, **{f"input: {name}": entry.get("path")
                                            or entry.get("dataset") for name, entry
                                            in run.inputs.items()}}
        run.write("report.html", lambda path: write_report(
            st, path, key=PROPORTIONS_KEY, cells=cells, spatial_key=spatial_key, run=facts,
            title=f"spotlens report — {run.folder.resolve().name}"))
    manifest = run.finish()
    for path in [*run.written, manifest]:
        typer.echo(f"wrote {path}")


def _counts_in_raw(adata, layer: str | None, *, what: str, flag: str):
    """``(adata, layer)`` to pass on; ``--layer raw`` (no layer named 'raw') reads ``.raw``.

    The library reads counts from ``X`` or a layer; counts kept in ``.raw`` (often with more
    genes than ``X``) are read by making ``adata.raw`` the object: its counts in ``X``, with
    ``obs``, ``obsm`` and ``uns`` of ``adata``.
    """
    if layer != "raw" or layer in adata.layers:
        return adata, layer
    if adata.raw is None:
        have = ", ".join(map(repr, adata.layers.keys())) or "none"
        raise InputError(
            f"{flag} raw reads the counts held in .raw, but the {what} has no .raw (layers: "
            f"{have}). Pass {flag} with the layer that holds raw counts, or leave it out to use "
            "X."
        )
    logger.info("%s raw: using the counts in .raw of the %s (%d genes)", flag, what,
                adata.raw.n_vars)
    return adata.raw.to_adata(), None
