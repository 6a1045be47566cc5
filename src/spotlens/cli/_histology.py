"""``spotlens histology train|evaluate|predict``: expression from H&E on the command line.

Each command writes its folder through :func:`._outputs.output_folder`, as ``deconvolve``
does: ``OUT/spotlens_run.json`` is written last with ``"complete": true``, a folder holding
another run's results is refused without ``--overwrite``, and the library's errors name the
command's flags (``tile_scales`` -> ``--tile-scales``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer

from .._validation import InputError
from ._common import (
    DeviceOption,
    ProgressOption,
    QuietOption,
    check_device,
    errors,
    log_to_stderr,
)
from ._outputs import MANIFEST_NAME, OverwriteOption, output_folder

logger = logging.getLogger("spotlens")

#: Files 'train' writes (see spotlens.histology._folder); without a manifest, any of them in
#: OUT marks an earlier run's model, which --resume continues.
TRAIN_OUTPUTS = ("config.json", "model.pt", "model.npz", "uncertainty.npz", "checkpoint.pt",
                 "checkpoint-final.pt", "checkpoint.json")
EVALUATE_OUTPUTS = ("evaluation.csv", "pearson_per_gene.csv")
#: Besides OUT/<gene>.png for each --plot-genes (listed in the manifest).
PREDICT_OUTPUTS = ("predicted.h5ad",)
#: Written by 'predict --report' (a larger image's tiles beside it, in OUT/report_files/).
PREDICT_REPORT = "report.html"

histology_app = typer.Typer(
    name="histology",
    help="Predict spot expression from H&E images: train a model on sections with both, "
         "score it on held-out sections, predict on an image alone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# `--sections A.h5ad B.h5ad` (several values after one flag) arrive as extra arguments
_MANY = {"allow_extra_args": True, "ignore_unknown_options": False}

SectionsOption = Annotated[list[Path], typer.Option(
    "--sections", "-s", metavar="H5AD...", show_default=False,
    help="Section .h5ad files (raw counts, obsm['spatial'] in full-resolution px); list them "
         "after one --sections or repeat the flag. The H&E image beside each, <stem>_HE*.jpg|"
         "png|tif|tiff|svs, is used unless --images is given.")]
ImagesOption = Annotated[list[Path] | None, typer.Option(
    "--images", metavar="IMAGE", show_default=False,
    help="Full-resolution H&E image of each section, in the order of --sections (repeat the "
         "flag) [default: found beside each .h5ad].")]
CacheOption = Annotated[Path | None, typer.Option(
    "--cache-dir", metavar="DIR", show_default=False,
    help="Folder of cached encoder features (re-runs skip the encoder) [default: no cache].")]
EncoderWeightsOption = Annotated[Path | None, typer.Option(
    "--encoder-weights", metavar="FILE", show_default=False,
    help="Checkpoint of the encoder architecture: a torchvision-format ResNet-50 for "
         "'resnet50', a timm-format Vision Transformer (e.g. a pathology foundation model, "
         "its config.json beside it) for 'vit'.")]
MovedWeightsOption = Annotated[Path | None, typer.Option(
    "--encoder-weights", metavar="FILE", show_default=False,
    help="Where the encoder checkpoint the model was trained with is now, if it has moved.")]
ModelOption = Annotated[Path, typer.Option(
    "--model", "-m", metavar="DIR", show_default=False, help="Model folder written by 'train'.")]


def _sections(ctx: typer.Context, sections: list[Path], images: list[Path] | None, run=None):
    """Read the sections (and find their images); record them as inputs of ``run``."""
    from ..io import read_section

    extra = [a for a in ctx.args]
    flags = [a for a in extra if a.startswith("-")]
    if flags:
        raise InputError(f"Unknown option(s) {flags}; see --help.")
    paths = [*sections, *map(Path, extra)]
    if not paths:
        raise InputError("Pass at least one section with --sections FILE.h5ad.")
    if images and len(images) != len(paths):
        raise InputError(f"{len(images)} --images for {len(paths)} sections; give one image per "
                         "section, in the same order, or none to use the images beside them.")
    pairs = []
    for i, path in enumerate(paths):
        logger.info("reading %s", path)
        adata, image = read_section(path, images[i] if images else None)
        if run is not None:
            run.add_input(f"section_{i + 1}", path, adata=adata)
            run.add_input(f"image_{i + 1}", image)
        pairs.append((adata, image))
    return pairs


def _genes(value: str):
    value = value.strip()
    if value in ("hvg", "top_expressed", "svg"):
        return value
    genes = [g.strip() for g in value.split(",") if g.strip()]
    if not genes:
        raise InputError("--genes must be 'hvg', 'top_expressed', 'svg' or a comma-separated "
                         "list.")
    return genes


def _mpps(value: str | None):
    """``--mpp``: None, one number (all sections) or a list (one per section)."""
    if value is None:
        return None
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError as err:
        raise InputError(f"--mpp must be µm per pixel, one number or one per section separated "
                         f"by commas (e.g. 0.5 or 0.5,0.5,0.69), got {value!r}.") from err
    from ..io import check_mpp

    values = [check_mpp(v, what="--mpp") for v in values]
    return values[0] if len(values) == 1 else values


@histology_app.command("train", context_settings=_MANY, no_args_is_help=True,
                       short_help="Train a model of spot expression from H&E tiles.")
def train_command(
    ctx: typer.Context,
    sections: SectionsOption,
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False,
        help="Model folder (created if missing). A folder with another run's results is "
             "refused unless --overwrite; an interrupted training run there is resumed.")],
    images: ImagesOption = None,
    model_type: Annotated[str, typer.Option(
        "--model-type", metavar="ridge|attention|graph|nucleus",
        help="PCA + ridge (penalty and projection rank by leave-one-section-out CV), "
             "spot-interaction attention, graph autoencoder + GCN, or the nucleus-level "
             "model (nuclei segmented and predicted so that they add up to each spot; "
             "predict with --level nucleus). The defaults of this "
             "command are the route the frozen protocol selects "
             "(benchmarks/results/histology_her2st_protocol.md).")
    ] = "ridge",
    genes: Annotated[str, typer.Option(
        metavar="hvg|top_expressed|svg|G1,G2,...",
        help="Target genes: 50 highly variable genes, the 250 most expressed, 50 spatially "
             "variable genes (Moran's I), or a list; chosen on the training sections as the "
             "frozen protocol does (mitochondrial, ribosomal and housekeeping genes excluded) "
             "and recorded with the model.")] = "hvg",
    encoder: Annotated[str, typer.Option(
        help="Tile encoder: 'efficientnet-lite0', 'resnet50' or 'vit' (with --encoder-weights), "
             "a TorchScript file, or 'colour' (25 colour statistics).")] = "efficientnet-lite0",
    encoder_weights: EncoderWeightsOption = None,
    tile_um: Annotated[float | None, typer.Option(
        metavar="µm", show_default=False,
        help="Tile side in µm [default: each section's spot diameter].")] = None,
    mpp: Annotated[str | None, typer.Option(
        metavar="µm/px[,µm/px...]", show_default=False,
        help="µm per pixel of the full-resolution images: one number for all sections or one "
             "per section, in the order of --sections [default: from a TIFF/SVS or the .h5ad "
             "(uns['spatial'][...]['scalefactors'|'metadata']['microns_per_pixel']); needed "
             "where neither records it].")] = None,
    tile_scales: Annotated[str, typer.Option(
        metavar="S1,S2,...",
        help="Tile sides as multiples of --tile-um whose features are put side by side "
             "(the spot and wider fields of view around it).")] = "1,2,4",
    standardize: Annotated[bool, typer.Option(
        "--standardize/--no-standardize",
        help="Z-score image features within each section (removes section-wide stain "
             "shifts; reads the whole slide's images, never its expression).")] = True,
    out_px: Annotated[int, typer.Option(min=8, help="Tile side after resizing, px.")] = 224,
    epochs: Annotated[int, typer.Option(
        min=1, help="Maximum training epochs (attention, graph).")] = 300,
    patience: Annotated[int, typer.Option(
        min=1, help="Stop after this many epochs without a better validation score (attention, "
                    "graph).")] = 40,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.95,
                                            help="Dropout (attention, graph).")] = 0.2,
    expression_rank: Annotated[str, typer.Option(
        metavar="auto|full|N",
        help="Project predictions onto N principal axes of the training expression; 'auto' "
             "chooses N (or full) on the validation section; 'full': no projection. The ridge "
             "model always chooses it by cross-validation.")] = "auto",
    finetune_head: Annotated[bool, typer.Option(
        "--finetune-head/--no-finetune-head",
        help="Train a copy of the encoder's last layer with the model (attention, graph; "
             "efficientnet-lite0 only; several minutes on a CPU).")] = False,
    lr: Annotated[float, typer.Option(
        min=1e-8, help="Learning rate of the model (attention, graph).")] = 1e-3,
    cache_dir: CacheOption = None,
    device: DeviceOption = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of initialisation and dropout.")] = 0,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume",
        help="Continue an interrupted (unfinished) run in OUT from OUT/checkpoint*.pt; "
             "--no-resume removes its files and starts over.")
    ] = True,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Train on sections with expression and H&E; write OUT/config.json and the model file.

    By default: ridge on the spots' EfficientNet-Lite0 features at three fields of view
    (--tile-scales 1,2,4; z-scored within each section) for 50 HVGs, penalty and projection rank by leave-one-section-out CV (OUT/model.npz) — the
    route the frozen protocol selects. Networks (--model-type attention|graph): early stopping
    on the last section listed (training on the others), then a refit on all sections for the
    best number of epochs (OUT/model.pt). OUT/spotlens_run.json, written last, records the
    run. Re-running into OUT resumes an interrupted run; a finished one needs --overwrite.

    Sections are checked before any tile is encoded: a known scale (--mpp where neither the
    image nor the .h5ad records it), spots on the image, the image matching the section's
    stored low-resolution copy, and the --genes present.

    Example: spotlens histology train --sections C2.h5ad C3.h5ad C4.h5ad C5.h5ad
    --tile-um 100 -o her2st_model

    Example (JPEGs of unrecorded scale): spotlens histology train --sections MOB1.h5ad
    MOB2.h5ad MOB3.h5ad --mpp 4.16 -o mob_model
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        from ..histology import MODEL_TYPES, TrainConfig, train

        if model_type not in MODEL_TYPES:
            raise InputError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got "
                             f"{model_type!r}.")
        check_device(device)
        gene_arg = _genes(genes)
        mpp_arg = _mpps(mpp)
        config = None
        if MODEL_TYPES[model_type].trains_network:
            rank = expression_rank.strip().lower()
            if rank not in ("auto", "full"):
                try:
                    rank = int(rank)
                except ValueError as err:
                    raise InputError(f"--expression-rank must be 'auto', 'full' or a positive "
                                     f"integer, got {expression_rank!r}.") from err
            config = TrainConfig(model=model_type, epochs=epochs, patience=patience,
                                 dropout=dropout, seed=seed, finetune_head=finetune_head, lr=lr,
                                 expression_rank=None if rank == "full" else rank)
        try:
            scales = [float(v) for v in tile_scales.split(",") if v.strip()]
        except ValueError as err:
            raise InputError(f"--tile-scales must be numbers separated by commas, got "
                             f"{tile_scales!r}.") from err
        planned = ["config.json", MODEL_TYPES[model_type].file, "uncertainty.npz"]
        if MODEL_TYPES[model_type].trains_network:
            planned += ["checkpoint.pt", "checkpoint-final.pt", "checkpoint.json"]
        with _undone_if_empty(out), output_folder(out, known=TRAIN_OUTPUTS, overwrite=overwrite,
                                                  keep_unfinished=resume) as run:
            pairs = _sections(ctx, sections, images, run)
            # clears an earlier run's files (--overwrite, or unfinished with --no-resume) before
            # train() reads checkpoints; train() checks the sections, genes and encoder first
            run.start_writing(planned)
            train(pairs, genes=gene_arg, model=model_type, encoder=encoder,
                  encoder_weights=encoder_weights, tile_um=tile_um, mpp=mpp_arg,
                  tile_scales=scales, standardize=standardize, out_px=out_px, config=config,
                  cache_dir=cache_dir, device=device, seed=seed,
                  out=run.folder, resume=resume, progress=progress)
            # the model is every planned file there, those kept from a resumed run included
            run.record(*(p for p in map(run.path, planned) if p.is_file()))
            run.record_changed()
            manifest = run.finish()
        _echo_written(run, manifest)


@histology_app.command("evaluate", context_settings=_MANY, no_args_is_help=True,
                       short_help="Score a model on sections with measured expression.")
def evaluate_command(
    ctx: typer.Context,
    model: ModelOption,
    sections: SectionsOption,
    images: ImagesOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False,
        help="Also write DIR/evaluation.csv, DIR/pearson_per_gene.csv and "
             "DIR/spotlens_run.json (created if missing; a folder with another run's results "
             "is refused unless --overwrite).")] = None,
    encoder_weights: MovedWeightsOption = None,
    cache_dir: CacheOption = None,
    device: DeviceOption = "cpu",
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Print mean per-gene Pearson r, MSE and spots of each section.

    Targets are log1p(normalize_total(counts, 1e4)) of the model's genes; genes a section
    lacks count as 0.

    Example: spotlens histology evaluate --model her2st_model --sections C6.h5ad B4.h5ad
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        import pandas as pd

        from ..histology import evaluate_model as evaluate
        from ..histology import load_model

        check_device(device)
        if overwrite and out is None:
            raise InputError("--overwrite replaces the files of an earlier run in the folder "
                             "given with --out; add --out DIR.")
        folder = nullcontext() if out is None else output_folder(
            out, known=EVALUATE_OUTPUTS, overwrite=overwrite)
        with folder as run:
            pairs = _sections(ctx, sections, images, run)
            if run is not None:
                run.add_input("model", model)
            fitted = load_model(model, device=device, encoder_weights=encoder_weights)
            table = evaluate(fitted, pairs, cache_dir=cache_dir, device=device,
                             progress=progress)
            typer.echo(table.to_string(float_format=lambda v: f"{v:.3f}"))
            if run is None:
                return
            from ..io import write_csv

            per_gene = pd.DataFrame(table.attrs["per_gene"])
            per_gene.index.name = "gene"
            run.start_writing(EVALUATE_OUTPUTS)
            run.write("evaluation.csv", lambda path: write_csv(table, path))
            run.write("pearson_per_gene.csv", lambda path: write_csv(per_gene, path))
            manifest = run.finish()
        _echo_written(run, manifest)


@histology_app.command("predict", no_args_is_help=True,
                       short_help="Predict expression on a grid over the tissue of an image.")
def predict_command(
    model: ModelOption,
    image: Annotated[Path, typer.Option("--image", "-i", metavar="IMAGE", show_default=False,
                                        help="Full-resolution H&E image.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False,
        help="Output folder (created if missing). A folder with another run's results is "
             "refused unless --overwrite.")],
    mpp: Annotated[float | None, typer.Option(
        metavar="µm/px", show_default=False,
        help="µm per pixel of the image [default: from a TIFF/SVS; JPEG/PNG need it].")] = None,
    spacing_um: Annotated[float | None, typer.Option(
        metavar="µm", show_default=False,
        help="Grid pitch [default: the training spots' pitch].")] = None,
    plot_genes: Annotated[str | None, typer.Option(
        metavar="G1,G2,...", show_default=False,
        help="Write OUT/<gene>.png, the predicted expression over the image, for these genes.")
    ] = None,
    level: Annotated[str, typer.Option(
        help="'spot': a grid over the tissue; 'nucleus': every nucleus (a nucleus model).")
    ] = "spot",
    section: Annotated[Path | None, typer.Option(
        "--section", "-s", metavar="H5AD", show_default=False,
        help="--level nucleus: the image's spots (.h5ad) [default: a grid over the tissue, "
             "as --level spot].")] = None,
    nuclei: Annotated[Path | None, typer.Option(
        metavar="H5AD", show_default=False,
        help="--level nucleus: nuclei of 'histology segment' [default: segment here].")] = None,
    encoder_weights: MovedWeightsOption = None,
    cache_dir: CacheOption = None,
    device: DeviceOption = "cpu",
    report: Annotated[bool, typer.Option(
        "--report/--no-report",
        help="Also write OUT/report.html: one page (no server, no network) with the image, "
             "the predicted genes and their s.d. over it; open it in a browser. An image "
             "larger than 4096 px keeps its full resolution in OUT/report_files/ beside it.")
    ] = False,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Write OUT/predicted.h5ad (grid spots × model genes) and PNG overlays.

    With --level nucleus: OUT/nuclei_predicted.h5ad (nuclei × genes, obs 'spot', 'cell_type'),
    OUT/spots_from_nuclei.csv (spots × genes, sums of their nuclei), OUT/nuclei_<gene>.png.

    X holds predicted log-normalised expression; obsm['spatial'] the spot centres in
    full-resolution px; uns['spatial'] a thumbnail and scale factors (sc.pl.spatial works).
    With --report also OUT/report.html (as 'spotlens report OUT' writes it).
    OUT/spotlens_run.json, written last, records the run.

    Example: spotlens histology predict -m her2st_model -i C6_HE_fullres.jpg --mpp 0.684
    -o C6_pred --plot-genes ERBB2
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        from ..histology import load_model, predict_image
        from ..io import save_figure, write_h5ad
        from ..pl import overlay

        from ._nucleus_outputs import NUCLEUS_OUTPUTS, predict_nuclei_run

        check_device(device)
        if level not in ("spot", "nucleus"):
            raise InputError(f"--level must be 'spot' or 'nucleus', got {level!r}.")
        if report and level == "nucleus":
            raise InputError("--report shows the spot grid of --level spot; leave it out with "
                             "--level nucleus.")
        known = NUCLEUS_OUTPUTS if level == "nucleus" else (*PREDICT_OUTPUTS, PREDICT_REPORT)
        with output_folder(out, known=known, overwrite=overwrite) as run:
            run.add_input("model", model)
            run.add_input("image", image)
            fitted = load_model(model, device=device, encoder_weights=encoder_weights)
            genes = list(dict.fromkeys(g.strip() for g in (plot_genes or "").split(",")
                                       if g.strip()))
            unknown = [g for g in genes if g not in fitted.genes]
            if unknown:
                raise InputError(f"--plot-genes {unknown} are not among the model's "
                                 f"{len(fitted.genes)} genes (e.g. {fitted.genes[:5]}).")
            pngs = {f"{_safe(gene)}.png": gene for gene in genes}
            if len(pngs) < len(genes):
                raise InputError(f"--plot-genes {genes} give the same file name twice once "
                                 "characters other than letters, digits, '-', '_' and '.' "
                                 "become '_'; plot those genes in separate runs.")
            if level == "nucleus":
                predict_nuclei_run(run, fitted, image=image, section=section, nuclei=nuclei,
                                   mpp=mpp, genes=genes, cache_dir=cache_dir,
                                   progress=progress, spacing_um=spacing_um)
                pngs = {}
            else:
                result = predict_image(fitted, image, mpp=mpp, spacing_um=spacing_um,
                                       cache_dir=cache_dir, device=device,
                                       progress=progress)
                run.start_writing([*PREDICT_OUTPUTS, *pngs,
                                   *([PREDICT_REPORT] if report else [])])
                run.write("predicted.h5ad", lambda path: write_h5ad(result, path))
            for name, gene in pngs.items():
                fig = overlay(result, [gene], label="predicted log-normalised expression")
                run.write(name, lambda path, fig=fig: save_figure(fig, path))
            if report:
                run.write(PREDICT_REPORT, lambda path: _report(run, result, image, path))
            manifest = run.finish()
        _echo_written(run, manifest)


def _report(run, result, image: Path, path: Path) -> None:
    """Write the HTML report of a prediction over its full-resolution image (atomically)."""
    from ..pl import report

    facts = {"command": run.command, **{f"input: {name}": entry.get("path")
                                        for name, entry in run.inputs.items()}}
    report(result, path, image=image, run=facts,
           title=f"spotlens report — {run.folder.resolve().name}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _echo_written(run, manifest: Path) -> None:
    for path in [*run.written, manifest]:
        typer.echo(f"wrote {path}")


@contextmanager
def _undone_if_empty(out: Path) -> Iterator[None]:
    """Remove ``out`` again when a run that created it fails having written only its manifest.

    ``train`` checks the sections, genes and encoder only once called, after
    :meth:`~._outputs.OutputRun.start_writing` (which must clear an earlier run's checkpoints
    before ``train`` reads them); a run refused there leaves no new folder, as a failing
    ``deconvolve`` does. A folder that existed, or that holds anything else (checkpoints to
    resume from), is left with its manifest marking the run as failed.
    """
    out = out.expanduser()
    missing = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        if missing and _only_own_manifest(out):
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            for folder in missing:
                try:
                    folder.rmdir()  # only ever succeeds on an empty folder
                except OSError:
                    break
        raise


def _only_own_manifest(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the unfinished manifest of this process."""
    try:
        if [p.name for p in folder.iterdir()] != [MANIFEST_NAME]:
            return False
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("complete") is False
            and manifest.get("pid") == os.getpid() and not manifest.get("files"))
