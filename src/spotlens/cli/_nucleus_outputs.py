"""``spotlens histology predict --level nucleus``: what that branch reads and writes.

A helper of the ``predict`` command (as ``_outputs.py`` is), not a command of its own: it reads
the section's spots (and nuclei, or segments them), calls
:meth:`~spotlens.histology.HistologyModel.predict_nuclei`, and writes

- ``OUT/nuclei_predicted.h5ad``: nuclei × genes (``X`` each nucleus's log-normalised expression,
  ``layers["counts"]`` its expected counts, ``obsm["spatial"]`` centroids in full-resolution
  px, ``obs["spot"]``, and ``obs["cell_type"]``, ``obs["cell_type_confidence"]`` when the model
  has types);
- ``OUT/spots_from_nuclei.csv``: spots × genes, the sums of their nuclei (the section's spots,
  or without ``--section`` the pseudo-spots of a grid over the tissue);
- ``OUT/nuclei_<gene>.png`` for ``--plot-genes``: nuclei coloured by the gene over the H&E.
"""

from __future__ import annotations

from pathlib import Path

from .._validation import InputError

#: files the nucleus branch writes (besides the per-gene PNGs)
NUCLEUS_OUTPUTS = ("nuclei_predicted.h5ad", "spots_from_nuclei.csv")


def predict_nuclei_run(run, fitted, *, image: Path, section: Path | None, nuclei: Path | None,
                       mpp, genes: list[str], cache_dir, progress: bool,
                       spacing_um: float | None = None) -> None:
    """Predict every nucleus of ``image`` with a nucleus model and write the outputs to ``run``.

    With ``section`` (the image's spots) the nuclei are summed into those spots; without, into
    a grid of pseudo-spots over the tissue (:func:`~spotlens.histology.predict_image_nuclei`,
    pitch ``spacing_um`` or the training spots').

    Raises
    ------
    InputError
        A file that does not exist, or a model that is not a nucleus model.
    """
    import anndata as ad

    from ..io import read_image, save_figure, write_csv, write_h5ad

    if fitted.settings.model_type != "nucleus":
        raise InputError(f"--level nucleus needs a nucleus model (spotlens histology train "
                         f"--model-type nucleus); {fitted.path} is "
                         f"{fitted.settings.model_type!r}.")
    for path, what in ((section, "--section"), (nuclei, "--nuclei")):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{what} {path} does not exist.")
    cells = None
    if nuclei is not None:
        cells = ad.read_h5ad(nuclei)
        run.add_input("nuclei", nuclei)
    slide = read_image(image, mpp=mpp)
    if section is None:  # the image alone: a grid of pseudo-spots over its tissue
        from ..histology import predict_image_nuclei

        result = predict_image_nuclei(fitted, slide, nuclei=cells, mpp=mpp,
                                      spacing_um=spacing_um, cache_dir=cache_dir,
                                      progress=progress)
    else:
        spots = ad.read_h5ad(section)
        run.add_input("section", section, adata=spots)
        result = fitted.predict_nuclei(spots, image=slide, cells=cells, cache_dir=cache_dir,
                                       progress=progress)
    pngs = {f"nuclei_{_safe(g)}.png": g for g in genes}
    run.start_writing([*NUCLEUS_OUTPUTS, *pngs])
    table = result.uns["nucleus_prediction"]["spot_expression"]
    table.index.name = "spot"
    run.write("nuclei_predicted.h5ad", lambda path: write_h5ad(result, path))
    run.write("spots_from_nuclei.csv", lambda path: write_csv(table, path))
    for name, gene in pngs.items():
        fig = _gene_figure(result, gene, slide)
        run.write(name, lambda path, fig=fig: save_figure(fig, path))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _gene_figure(result, gene: str, slide):
    """Nuclei coloured by their predicted ``gene`` over a thumbnail of the H&E."""
    import matplotlib.pyplot as plt
    import numpy as np

    thumb, scale = slide.thumbnail(2000)
    xy = np.asarray(result.obsm["spatial"]) * scale
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(thumb)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=result[:, gene].X.ravel(), s=0.5, lw=0,
                    cmap="magma")
    fig.colorbar(sc, ax=ax, fraction=0.04, label=f"{gene}: log1p(1e4 · counts / total)")
    ax.set_axis_off()
    return fig
