"""A frozen evaluation protocol for expression from H&E: nested choices, one look at the test.

Every choice is made on the training sections, and the test sections' expression is read once,
after every model is fitted and every test prediction made:

1. **Gene sets** (:func:`~spotlens.histology._gene_sets.select_gene_sets`) on the training
   sections' counts.
2. **Each model's own settings** (ridge penalty, projection rank) by leave-one-section-out
   cross-validation inside the sections it is fitted on (as :class:`RidgeBaseline`; the
   feature SVDs of each subset of sections are computed once, ``_protocol_models.py``).
3. **The model type** (``"selected"``): for each training section ``h``, every candidate is
   fitted on the other training sections (genes chosen on them, its settings by its own
   leave-one-section-out CV on them: nested) and scored on ``h``; by the one-standard-error
   rule (``ProtocolConfig.selection``, :func:`choose_candidate`), the candidate with the
   fewest parameters whose mean score is within one standard error of the best is refitted on
   all training sections. The **route** of a gene set is the selected candidate and feature
   standardisation with the best such mean score over both standardisations (what
   ``spotlens histology train`` does by default).
4. **Scoring**: each test section's expression is read once and every model's predictions are
   scored on it: mean per-gene Pearson r with a spatial block-bootstrap interval
   (:mod:`~spotlens.histology._intervals`), and paired intervals for each model minus the
   frozen-feature ridge, and for per-section minus training-set feature standardisation.

Models reported beside every candidate: ``"ridge"`` (the HEST-Benchmark frozen-feature ridge:
standardise with training moments → PCA(256) → ridge, Jaume G. et al., NeurIPS 2024,
https://arxiv.org/abs/2406.16192) and ``"rank1"`` (that ridge's predictions projected onto the
first principal axis of the z-scored training expression: a one-dimensional tissue axis).

Feature standardisation, reported separately (``standardization``):

- ``"training"``: features as given; models standardise them with training-set moments
  (inductive: a test spot's prediction depends on its own tile only);
- ``"section"``: every section's features z-scored over its own spots
  (:func:`~spotlens.histology._normalize.standardize_section`), the test sections' too. This
  reads the test slide's *images* (never its expression): transductive, fine for a user who
  has the whole slide, but it must be stated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from .._validation import InputError
from ._gene_sets import select_gene_sets
from ._intervals import block_bootstrap_pearson, paired_block_bootstrap_pearson
from ._metrics import pearson_per_gene, section_log_expression
from ._normalize import standardize_section
from ._protocol_config import (
    MARKERS,
    MODELS,
    PARSIMONY,
    SELECTION_RULES,
    EvalSection,
    ProtocolConfig,
    _check_sections,
)
from ._protocol_models import FeatureBank, Fitted

logger = logging.getLogger("spotlens")


def _fit_model(name: str, bank: FeatureBank, names: tuple[str, ...], ys: dict,
               config: ProtocolConfig) -> Fitted:
    """Fit model type ``name`` on the sections ``names`` (the one place models are fitted)."""
    return MODELS[name](bank, names, ys, config)


# --------------------------------------------------------------------------------------------
# Fitting on the training sections (no test section in reach)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolChoices:
    """Everything the training sections decided.

    Attributes
    ----------
    genes
        Gene set name -> genes, in rank order.
    models
        One row per ``(gene_set, standardization, model)``: ``alpha``, ``rank``, ``loso_r``
        and ``loso_se`` (a candidate's nested leave-one-section-out mean r and its standard
        error over the held-out sections; NaN for the others) and, for ``"selected"``, the
        model type chosen (``chosen``).
    route
        One row per gene set: the ``standardization`` and the ``model`` selected under it
        with the better nested leave-one-section-out mean r, that ``loso_r`` and ``loso_se``
        (ties: the first standardisation).
    """

    genes: dict[str, tuple[str, ...]]
    models: pd.DataFrame
    route: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class FittedProtocol:
    """The choices and the final models, fitted on all training sections."""

    config: ProtocolConfig
    choices: ProtocolChoices
    predictors: dict = field(repr=False)  # (gene_set, standardization, model) -> Fitted
    train_sections: tuple[str, ...] = ()
    n_features: int = 0


def _coords(section: EvalSection, config: ProtocolConfig) -> np.ndarray:
    return np.asarray(section.adata.obsm[config.spatial_key], dtype=np.float64)


def _features(section: EvalSection, standardization: str) -> np.ndarray:
    x = np.asarray(section.features, dtype=np.float64)
    return np.asarray(standardize_section(x), dtype=np.float64) if standardization == "section" \
        else x


def _fold_targets(train: list[EvalSection], gene_set: str, config: ProtocolConfig) -> list:
    """Per outer fold: held-out name, the other names, their targets and the held-out targets,
    on genes chosen without the held-out section."""
    folds = []
    for held in train:
        rest = [s for s in train if s is not held]
        genes = _markers(rest, config) if gene_set == MARKERS else select_gene_sets(
            {s.name: s.adata for s in rest}, exclude=config.exclude,
            spatial_key=config.spatial_key, **config.set_sizes(gene_set))[gene_set]
        ys = {s.name: section_log_expression(s.adata, genes) for s in rest}
        folds.append((held.name, tuple(ys), ys, section_log_expression(held.adata, genes)))
    return folds


def _markers(train: list[EvalSection], config: ProtocolConfig) -> list[str]:
    """``config.markers`` found in at least one of the sections ``train``."""
    known = {g for s in train for g in s.adata.var_names}
    present = [g for g in dict.fromkeys(config.markers) if g in known]
    if not present:
        raise InputError(f"None of the markers {list(config.markers)} is in the training "
                         "sections.")
    return present


def choose_candidate(fold_scores: dict[str, Sequence[float]], rule: str = "one_se") -> str:
    """The model type the nested selection picks from its per-section scores.

    Parameters
    ----------
    fold_scores
        Candidate -> its score on each held-out training section (same sections, same order).
    rule
        ``"one_se"``: of the candidates whose mean score is at least the best mean minus the
        standard error of the best candidate's scores (sample standard deviation / √ sections),
        the one with the fewest parameters (:data:`PARSIMONY`; Breiman et al. 1984, Hastie et
        al. 2009 §7.10); ``"best"``: the best mean (ties: the first in ``fold_scores``).

    Raises
    ------
    InputError
        An unknown rule or model type, or no candidates.
    """
    if rule not in SELECTION_RULES:
        raise InputError(f"rule must be one of {SELECTION_RULES}, got {rule!r}.")
    unknown = [c for c in fold_scores if c not in PARSIMONY]
    if not fold_scores or unknown:
        raise InputError(f"fold_scores must map model types of {PARSIMONY} to their scores; "
                         f"got {list(fold_scores) or 'none'}.")
    means = {c: float(np.mean(v)) for c, v in fold_scores.items()}
    best = max(fold_scores, key=lambda c: means[c])  # ties -> the first listed
    if rule == "best":
        return best
    within = [c for c in fold_scores if means[c] >= means[best] - _standard_error(
        fold_scores[best])]
    return min(within, key=lambda c: (PARSIMONY.index(c), -means[c]))


def _standard_error(scores: Sequence[float]) -> float:
    """Standard error of the mean (``scipy.stats.sem``); 0 for a single score."""
    return float(stats.sem(scores)) if len(scores) > 1 else 0.0


def _loso_select(folds: list, bank: FeatureBank, config: ProtocolConfig
                 ) -> tuple[str, dict[str, float], dict[str, float]]:
    """Nested leave-one-section-out: each candidate fitted without ``h``, scored on ``h``.

    Returns the chosen candidate, and each candidate's mean score and its standard error.
    """
    scores = {c: [] for c in config.candidates}
    for held, names, ys, y_held in folds:
        for cand in config.candidates:
            pred = _fit_model(cand, bank, names, ys, config).predict(
                bank.features[held], bank.coords.get(held))
            scores[cand].append(float(pearson_per_gene(pred, y_held)[0].mean()))
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    errors = {c: _standard_error(v) for c, v in scores.items()}
    return choose_candidate(scores, config.selection), means, errors


def fit_protocol(train_sections: Sequence[EvalSection],
                 config: ProtocolConfig = ProtocolConfig()) -> FittedProtocol:
    """Make every choice and fit every model on the training sections only.

    Takes no test section, so nothing it decides can depend on one.

    Parameters
    ----------
    train_sections
        At least 3 :class:`EvalSection` (the nested selection leaves one out and the models
        inside choose their penalty by leaving one more out).
    config
        :class:`ProtocolConfig`.

    Returns
    -------
    :class:`FittedProtocol`: :class:`ProtocolChoices` and, per ``(gene_set,
    standardization)``, the ``"ridge"`` and ``"rank1"`` baselines, every candidate, and
    ``"selected"`` (the chosen candidate, fitted on all training sections).

    Raises
    ------
    InputError
        Fewer than 3 training sections; bad sections (see :func:`run_protocol`).
    """
    if not isinstance(config, ProtocolConfig):
        raise InputError(f"config must be a ProtocolConfig, got {type(config).__name__}.")
    train = _check_sections(train_sections, "train_sections", need_counts=True,
                            spatial_key=config.spatial_key)
    if len(train) < 3:
        raise InputError(
            f"The nested protocol needs at least 3 training sections, got {len(train)}: one is "
            "left out to choose the model type and one more inside to choose its penalty.")
    widths = {np.shape(s.features)[1] for s in train}
    if len(widths) > 1:
        raise InputError(f"Training sections have features of different widths: {widths}.")
    genes = select_gene_sets({s.name: s.adata for s in train}, exclude=config.exclude,
                             spatial_key=config.spatial_key, **config.set_sizes())
    if config.markers:
        genes[MARKERS] = _markers(train, config)
    rows, routes, predictors = [], [], {}
    names = tuple(s.name for s in train)
    coords = {s.name: _coords(s, config) for s in train}
    banks = {std: FeatureBank({s.name: _features(s, std) for s in train}, config.n_components,
                              coords) for std in config.standardizations}
    for gene_set in config.scored_sets:
        ys = {s.name: section_log_expression(s.adata, genes[gene_set]) for s in train}
        folds = _fold_targets(train, gene_set, config)
        best = None
        for std in config.standardizations:
            chosen, loso, loso_se = _loso_select(folds, banks[std], config)
            for name in config.models:
                fitted = _fit_model(name, banks[std], names, ys, config)
                predictors[gene_set, std, name] = fitted
                rows.append({"gene_set": gene_set, "standardization": std, "model": name,
                             **fitted.params, "chosen": None, "loso_r": loso.get(name),
                             "loso_se": loso_se.get(name)})
            predictors[gene_set, std, "selected"] = predictors[gene_set, std, chosen]
            rows.append({"gene_set": gene_set, "standardization": std, "model": "selected",
                         **predictors[gene_set, std, chosen].params, "chosen": chosen,
                         "loso_r": loso[chosen], "loso_se": loso_se[chosen]})
            if best is None or loso[chosen] > best["loso_r"]:
                best = {"gene_set": gene_set, "standardization": std, "model": chosen,
                        "loso_r": loso[chosen], "loso_se": loso_se[chosen]}
            logger.info("protocol %s / %s: selected %s (LOSO r %s)", gene_set, std, chosen,
                        ", ".join(f"{k} {v:.3f}" for k, v in loso.items()))
        routes.append(best)
    choices = ProtocolChoices({k: tuple(v) for k, v in genes.items()},
                              pd.DataFrame(rows).astype({"loso_r": float, "loso_se": float}), pd.DataFrame(routes))
    return FittedProtocol(config, choices, predictors, names, widths.pop())


# --------------------------------------------------------------------------------------------
# Scoring: each test section's expression read once, after every prediction is made
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolResult:
    """What :func:`run_protocol` reports.

    Attributes
    ----------
    choices
        :class:`ProtocolChoices` (made on the training sections).
    scores
        One row per ``(section, gene_set, standardization, model)``: ``r`` (mean per-gene
        Pearson r) with ``low``/``high`` (block-bootstrap interval), ``diff_ridge``,
        ``diff_low``, ``diff_high`` (paired: this model − ``"ridge"``, same standardisation;
        NaN for the ridge itself), ``diff_std``, ``diff_std_low``, ``diff_std_high`` (paired:
        ``"section"`` − ``"training"`` standardisation, same model — for ``"selected"`` the two
        selected routes, possibly different types; on ``"section"`` rows),
        ``chosen`` (for ``"selected"``), ``n_spots``, ``n_genes``, ``n_blocks``.
    per_gene
        Long table of per-gene r: ``section``, ``gene_set``, ``standardization``, ``model``,
        ``gene``, ``r``, and ``low``/``high`` (the gene's block-bootstrap interval; for the
        ``"markers"`` set only, NaN otherwise).
    predictions
        ``(section, gene_set, standardization, model)`` -> the ``n_spots × n_genes``
        predicted log-normalised expression that was scored (genes in
        ``choices.genes[gene_set]`` order), so that models of separate protocol runs on the
        same sections can be compared without fitting them again.
    """

    choices: ProtocolChoices
    scores: pd.DataFrame
    per_gene: pd.DataFrame
    predictions: dict = field(default_factory=dict, repr=False)


def _read_expression(section: EvalSection, genes: Sequence[str]) -> np.ndarray:
    """The one place a test section's expression is read."""
    return section_log_expression(section.adata, genes)


def score_protocol(fitted: FittedProtocol, test_sections: Sequence[EvalSection]
                   ) -> ProtocolResult:
    """Predict every test section, then read each one's expression once and score.

    Parameters
    ----------
    fitted
        From :func:`fit_protocol`.
    test_sections
        :class:`EvalSection` objects not among the training sections.

    Returns
    -------
    :class:`ProtocolResult`.

    Raises
    ------
    InputError
        A test section that is also a training section, or bad sections.
    """
    config = fitted.config
    test = _check_sections(test_sections, "test_sections", need_counts=False,
                           spatial_key=config.spatial_key)
    overlap = sorted({s.name for s in test} & set(fitted.train_sections))
    if overlap:
        raise InputError(f"Sections {overlap} are both training and test sections.")
    for s in test:
        if np.shape(s.features)[1] != fitted.n_features:
            raise InputError(
                f"Test section {s.name!r} has {np.shape(s.features)[1]} features, the training "
                f"sections {fitted.n_features}: use the same encoder and tiles.")
    genes = fitted.choices.genes
    # every prediction first: features only
    preds = {(s.name, *key): model.predict(_features(s, key[1]), _coords(s, config))
             for s in test for key, model in fitted.predictors.items()}
    union = list(dict.fromkeys(g for gs in config.scored_sets for g in genes[gs]))
    chosen = fitted.choices.models.set_index(["gene_set", "standardization", "model"])["chosen"]
    rows, per_gene = [], []
    for s in test:
        observed_all = _read_expression(s, union)  # the one read of this section
        coords = _coords(s, config)
        boot = {"block_size": config.block_size, "n_boot": config.n_boot,
                "level": config.level, "seed": config.seed}
        for gene_set in config.scored_sets:
            cols = [union.index(g) for g in genes[gene_set]]
            observed = observed_all[:, cols]
            for std in config.standardizations:
                for model in (*config.models, "selected"):
                    pred = preds[s.name, gene_set, std, model]
                    ci = block_bootstrap_pearson(pred, observed, coords, **boot)
                    row = {"section": s.name, "gene_set": gene_set, "standardization": std,
                           "model": model, "r": ci.estimate, "low": ci.low, "high": ci.high}
                    diff = (paired_block_bootstrap_pearson(
                        pred, preds[s.name, gene_set, std, "ridge"], observed, coords, **boot)
                        if model != "ridge" else None)
                    row.update(diff_ridge=np.nan if diff is None else diff.estimate,
                               diff_low=np.nan if diff is None else diff.low,
                               diff_high=np.nan if diff is None else diff.high)
                    other = "training" if std == "section" else None
                    sd = (paired_block_bootstrap_pearson(
                        pred, preds[s.name, gene_set, other, model], observed, coords, **boot)
                        if other in config.standardizations else None)
                    row.update(diff_std=np.nan if sd is None else sd.estimate,
                               diff_std_low=np.nan if sd is None else sd.low,
                               diff_std_high=np.nan if sd is None else sd.high)
                    row.update(chosen=chosen.get((gene_set, std, model)), n_spots=len(pred),
                               n_genes=len(cols), n_blocks=ci.n_blocks)
                    rows.append(row)
                    r, _ = pearson_per_gene(pred, observed)
                    genes_ci = [block_bootstrap_pearson(pred[:, [j]], observed[:, [j]], coords,
                                                        **boot) if gene_set == MARKERS else None
                                for j in range(len(cols))]
                    per_gene.append(pd.DataFrame({
                        "section": s.name, "gene_set": gene_set, "standardization": std,
                        "model": model, "gene": list(genes[gene_set]), "r": r,
                        "low": [np.nan if c is None else c.low for c in genes_ci],
                        "high": [np.nan if c is None else c.high for c in genes_ci]}))
    return ProtocolResult(fitted.choices, pd.DataFrame(rows),
                          pd.concat(per_gene, ignore_index=True), preds)


def run_protocol(train_sections: Sequence[EvalSection], test_sections: Sequence[EvalSection],
                 config: ProtocolConfig = ProtocolConfig()) -> ProtocolResult:
    """The frozen protocol: :func:`fit_protocol` on the training sections, then
    :func:`score_protocol` on the test sections.

    Parameters
    ----------
    train_sections
        At least 3 :class:`EvalSection` with raw counts.
    test_sections
        :class:`EvalSection` objects; their expression is read once each, after every choice
        is made and every prediction computed.
    config
        :class:`ProtocolConfig`.

    Returns
    -------
    :class:`ProtocolResult`.

    Raises
    ------
    InputError
        Fewer than 3 training sections; repeated names or a section in both lists; features
        that are not ``n_spots × n_features`` or not finite, or of other widths; a section
        without ``obsm[spatial_key]``; a training section without counts.

    Examples
    --------
    >>> result = run_protocol(train, test, ProtocolConfig(n_boot=500))  # doctest: +SKIP
    >>> result.scores.query("model == 'selected'")  # doctest: +SKIP
    """
    spatial_key = config.spatial_key if isinstance(config, ProtocolConfig) else "spatial"
    test = _check_sections(test_sections, "test_sections", need_counts=False,
                           spatial_key=spatial_key)  # bad test input fails before any fit
    train_names = {getattr(s, "name", None) for s in (
        [train_sections] if isinstance(train_sections, EvalSection) else train_sections)}
    overlap = sorted(train_names & {s.name for s in test})
    if overlap:
        raise InputError(f"Sections {overlap} are both training and test sections.")
    widths = {np.shape(s.features)[1] for s in test}
    train_widths = {np.shape(getattr(s, "features", np.zeros((0, 0))))[-1] for s in (
        [train_sections] if isinstance(train_sections, EvalSection) else train_sections)}
    if len(widths | train_widths) > 1:
        raise InputError(f"Sections have features of different widths: "
                         f"{sorted(widths | train_widths)}; use the same encoder and tiles.")
    return score_protocol(fit_protocol(train_sections, config), test)
