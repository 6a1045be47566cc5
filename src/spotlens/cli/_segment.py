"""``spotlens histology segment``: nuclei of an H&E image, and nuclei per spot.

Writes its folder through :func:`._outputs.output_folder` like the other histology commands:
every file atomically, ``OUT/spotlens_run.json`` last with ``"complete": true``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from .._keys import N_NUCLEI_KEY
from .._validation import InputError
from ._common import ProgressOption, QuietOption, errors, log_to_stderr
from ._outputs import OverwriteOption, output_folder

logger = logging.getLogger("spotlens")

#: Files 'histology segment' writes (the CSV only with --section).
SEGMENT_OUTPUTS = ("nuclei.h5ad", "nuclei_per_spot.csv", "nuclei_overlay.png")


def segment_command(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", show_default=False,
                                          help="Full-resolution H&E image.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="DIR", show_default=False,
        help="Output folder (created if missing). A folder with another run's results is "
             "refused unless --overwrite.")],
    section: Annotated[Path | None, typer.Option(
        "--section", "-s", metavar="H5AD", show_default=False,
        help="Spots of this image (.h5ad, obsm['spatial'] in full-resolution px, the spot "
             "diameter in uns['spatial'][...]['scalefactors']): assign nuclei to spots and "
             "write OUT/nuclei_per_spot.csv.")] = None,
    mpp: Annotated[float | None, typer.Option(
        metavar="µm/px", show_default=False,
        help="µm per pixel of the image [default: from a TIFF/SVS, else from the --section "
             "(scalefactors or metadata 'microns_per_pixel'); JPEG/PNG alone need it].")] = None,
    tile_size: Annotated[int, typer.Option(min=16, help="Tile side, px.")] = 1024,
    n_jobs: Annotated[int, typer.Option(
        help="Worker processes; -1 = every core.")] = 1,
    min_area_um2: Annotated[float, typer.Option(
        metavar="µm²", help="Smallest nucleus kept.")] = 12.0,
    max_area_um2: Annotated[float, typer.Option(
        metavar="µm²", help="Largest nucleus kept.")] = 400.0,
    min_hematoxylin: Annotated[float, typer.Option(
        metavar="OD", help="Floor of the haematoxylin optical density of a nucleus pixel; "
                           "raise it where stroma is segmented.")] = 0.05,
    tissue: Annotated[bool, typer.Option(
        "--tissue/--no-tissue", help="Segment only tiles on tissue.")] = True,
    overwrite: OverwriteOption = False,
    progress: ProgressOption = True,
    quiet: QuietOption = False,
) -> None:
    """Segment nuclei; write OUT/nuclei.h5ad and OUT/nuclei_overlay.png.

    The classical pipeline needs no weights: haematoxylin by colour deconvolution, a local
    threshold, a distance-transform watershed and size filters in µm², tile by tile with a
    halo so a nucleus on a tile border is counted once. OUT/nuclei.h5ad holds one row per
    nucleus (obsm['spatial']: centroid in full-resolution px; obs: centroid in µm, area,
    perimeter, eccentricity, solidity, mean stain and colour; with --section the spot it lies
    in). With --section also OUT/nuclei_per_spot.csv (spot, n_nuclei). OUT/nuclei_overlay.png
    shows the outlines on a crop of the H&E (and the spot circles).

    Example: spotlens histology segment C6_HE_fullres.jpg -s C6.h5ad --n-jobs 2 -o C6_nuclei
    """
    with log_to_stderr(quiet), errors(cli_terms=True):
        import pandas as pd

        from ..histology import NucleusConfig, count_nuclei, nuclei_overlay, segment_nuclei
        from ..io import atomic_path, read_image, write_csv, write_h5ad

        config = NucleusConfig(min_area_um2=min_area_um2, max_area_um2=max_area_um2,
                               min_hematoxylin=min_hematoxylin)
        with output_folder(out, known=SEGMENT_OUTPUTS, overwrite=overwrite) as run:
            run.add_input("image", image)
            spots = None
            if section is not None:
                import anndata as ad

                if not section.is_file():
                    raise InputError(f"--section {section} does not exist.")
                spots = ad.read_h5ad(section)
                run.add_input("section", section, adata=spots)
            slide = read_image(image, mpp=mpp)
            nuclei = segment_nuclei(slide, adata=spots, config=config, tile_size=tile_size,
                                    n_jobs=n_jobs, tissue=tissue, progress=progress)
            planned = ["nuclei.h5ad", "nuclei_overlay.png"]
            if spots is not None:
                planned.insert(1, "nuclei_per_spot.csv")
            run.start_writing(planned)
            run.write("nuclei.h5ad", lambda path: write_h5ad(nuclei, path))
            if spots is not None:
                counts = count_nuclei(spots, nuclei, inplace=False)
                table = pd.DataFrame({N_NUCLEI_KEY: counts})
                table.index.name = "spot"
                run.write("nuclei_per_spot.csv", lambda path: write_csv(table, path))
            picture = nuclei_overlay(nuclei, image=slide, adata=spots)
            run.write("nuclei_overlay.png", lambda path: _write_png(picture, path, atomic_path))
            manifest = run.finish()
        typer.echo(f"{nuclei.n_obs} nuclei")
        for path in [*run.written, manifest]:
            typer.echo(f"wrote {path}")


def _write_png(array, path: Path, atomic_path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
