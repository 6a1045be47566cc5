"""The nucleus-level predictor, arrays in and out: fit (with its held-out protocol), predict,
save and read (:class:`NucleusPredictor`, the ``"nucleus"`` model type of ``_registry.py``).

Each training section is a dict of arrays:

- ``desc``: ``n_nuclei × n_desc`` nucleus descriptors, z-scored over the section's nuclei
  (``_nucleus_features.py``);
- ``spot``: ``n_nuclei`` index of the spot each nucleus lies in (-1 outside; those nuclei are
  predicted but carry no loss);
- ``nearest``: ``n_nuclei`` index of each nucleus's nearest spot, whose tile features are its
  context;
- ``features``: ``n_spots × n_features`` the spot tiles' features (standardised as the spot
  model's);
- ``y``: ``n_spots × n_genes`` measured ``log1p(normalize_total(counts, 1e4))``;
- ``library``: ``n_spots`` total counts of each spot;
- ``proportions`` (optional): ``n_spots × n_types`` deconvolved proportions.

Held-out protocol: leave-one-section-out over the training sections chooses what the nucleus
reads (``context="auto"``) and the number of epochs (the best mean over folds of the held-out
spots' mean Pearson r); then the network is refitted on all sections.

Contexts:

- ``"none"``: the nucleus's descriptor only;
- ``"spot"``: and the (PCA-reduced) tile features of its nearest spot;
- ``"route"``: as ``"spot"``, and every nucleus starts from its nearest spot's expression as
  predicted by the spot-level route (:class:`~spotlens.histology.RidgeBaseline` with its
  projection rank, on the same tile features): the route's profile, as log-rates, is an offset
  of the decoder, which starts at zero, so the untrained network *is* the spot route and
  training moves each nucleus away from its spot's profile as its appearance asks. The route
  is cross-fitted — the profile a training section's nuclei start from comes from a route
  fitted on the other training sections, never on that section — and, inside the
  leave-one-section-out choice, also without the held-out section. Epochs from 0 (the route
  itself, each nucleus given its spot's profile) are tried. Needs at least
  :data:`MIN_ROUTE_SECTIONS` training sections.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .._backend import import_torch
from .._validation import InputError
from ._metrics import pearson_per_gene

logger = logging.getLogger("spotlens")

FORMAT = "spotlens.NucleusPredictor/1"
CONTEXTS = ("spot", "none", "route")
#: training sections the ``"route"`` context needs: inside a leave-one-section-out fold each
#: section's prior comes from a route fitted (with its own cross-validation) on two others
MIN_ROUTE_SECTIONS = 4
#: floor of a gene's predicted share of a spot's counts in the route's prior
MIN_SHARE = 1e-8


@dataclass(frozen=True)
class NucleusModelConfig:
    """Settings of the nucleus-level network and its training.

    Attributes
    ----------
    context
        ``"spot"``: a nucleus reads its own descriptor and the (PCA-reduced) tile features of
        its nearest spot; ``"none"``: its descriptor only; ``"route"``: as ``"spot"``,
        starting from the spot-level route's prediction for its nearest spot (module
        docstring); ``"auto"``: the best of them by leave-one-section-out mean Pearson r on the
        training sections (``"route"`` only with at least :data:`MIN_ROUTE_SECTIONS`).
    context_dims
        Principal components kept of the spot tile features.
    hidden, latent, dropout
        Encoder widths and dropout (:class:`~spotlens.histology._nucleus_module.NucleusExpression`).
    lr, weight_decay
        Adam (AdamW) step size and decoupled weight decay.
    max_epochs, eval_every
        Epochs tried by the held-out protocol and how often it scores them.
    type_weight
        Weight of the cell-type term (with proportions).
    proportions_key
        ``obsm`` key of each training section's deconvolved proportions (a DataFrame, one
        column per cell type, e.g. from :func:`spotlens.deconv.deconvolve`); given, the model
        learns a type head whose mean over a spot's nuclei matches them. None = no types.
    seed
        Seed of initialisation and dropout.
    """

    context: str = "auto"
    context_dims: int = 32
    hidden: int = 128
    latent: int = 32
    dropout: float = 0.2
    lr: float = 5e-3
    weight_decay: float = 1e-3
    max_epochs: int = 120
    eval_every: int = 10
    type_weight: float = 1.0
    proportions_key: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.context not in (*CONTEXTS, "auto"):
            raise InputError(f"context must be one of {(*CONTEXTS, 'auto')}, got "
                             f"{self.context!r}.")


class NucleusPredictor:
    """Nucleus features -> per-nucleus expression (and types); spots = sums of their nuclei.

    Attributes
    ----------
    genes, types
        Genes decoded; cell types of the type head (empty: none).
    config
        :class:`NucleusModelConfig` (``context`` resolved after :meth:`fit`).
    epochs
        Epochs of the final fit.
    validation
        The held-out record: ``context_scores`` (context -> best mean r), ``per_section``,
        ``mean_pearson``, ``best_epoch``, ``curve`` (epoch -> mean r over folds).
    count_scale
        Factor taking the network's ``μ`` to expected counts per nucleus at the training
        sections' mean capture (mean spot total / mean summed nucleus total).

    Examples
    --------
    Arrays of each section as in the module docstring (``train(model="nucleus")`` builds them
    from AnnData; ``benchmarks/histology_nuclei.py`` from cached nuclei):

    >>> model = NucleusPredictor(genes).fit({"C2": c2, "C3": c3})  # doctest: +SKIP
    >>> out = model.predict(c6["desc"], c6["features"], c6["nearest"])  # doctest: +SKIP
    >>> out["counts"].shape  # n_nuclei × n_genes  # doctest: +SKIP
    """

    def __init__(self, genes, config: NucleusModelConfig | None = None, *, types=()):
        self.genes = list(genes)
        self.types = list(types)
        self.config = config or NucleusModelConfig()
        self.epochs = 0
        self.validation: dict = {}
        self.count_scale = 1.0
        self._net = None
        self._pca = None  # (mean, components, sd) of the spot features
        self._route = None  # the spot-level route of the "route" context

    # -- inputs --------------------------------------------------------------------------------
    @property
    def uses_context(self) -> bool:
        """Whether the nucleus reads its nearest spot's tile features."""
        return self.config.context in ("spot", "route")

    def _inputs(self, d: dict, pca, context: str, rows=None) -> np.ndarray:
        """Network inputs of the nuclei ``rows`` (None = all): descriptor [+ spot context]."""
        rows = slice(None) if rows is None else rows
        x = np.asarray(d["desc"], dtype=np.float32)[rows]
        if context in ("spot", "route"):
            mean, comps, sd = pca  # project the spots once, then look up each nucleus's
            ctx = (np.asarray(d["features"], dtype=np.float64) - mean) @ comps.T / sd
            x = np.hstack([x, ctx.astype(np.float32)[np.asarray(d["nearest"])[rows]]])
        return x

    def _fit_pca(self, sections: list[dict]):
        f = np.vstack([np.asarray(d["features"], dtype=np.float64) for d in sections])
        mean = f.mean(0)
        _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
        k = min(self.config.context_dims, len(s))
        sd = s[:k] / np.sqrt(max(len(f) - 1, 1))
        return mean, vt[:k], np.where(sd > 1e-12, sd, 1.0)

    # -- training ------------------------------------------------------------------------------
    def fit(self, sections: dict[str, dict], *, progress: bool = False) -> NucleusPredictor:
        """Choose context and epochs by leave-one-section-out, then refit on all sections.

        Raises
        ------
        InputError
            With fewer than 2 sections, a section without nuclei in its spots, or types
            without every section's ``proportions``.
        """
        names = list(sections)
        if len(names) < 2:
            raise InputError("The nucleus model chooses its settings by leave-one-section-out "
                             "and needs at least 2 training sections.")
        for n in names:
            if np.shape(sections[n]["y"])[1] != len(self.genes):
                raise InputError(f"Section {n!r}: expression of {np.shape(sections[n]['y'])[1]} "
                                 f"genes for a model of {len(self.genes)} genes.")
            if not (np.asarray(sections[n]["spot"]) >= 0).any():
                raise InputError(f"Section {n!r}: no nucleus lies in a spot, nothing to learn "
                                 "from (were the nuclei segmented with adata=spots?).")
            if self.types and sections[n].get("proportions") is None:
                raise InputError(f"Section {n!r} has no proportions for the type head.")
        if self.config.context == "route" and len(names) < MIN_ROUTE_SECTIONS:
            raise InputError(f"context='route' needs at least {MIN_ROUTE_SECTIONS} training "
                             f"sections (each section's starting profile comes from a spot "
                             f"route fitted on others, inside leave-one-section-out); got "
                             f"{len(names)}. Use context='spot'.")
        contexts = ((self.config.context,) if self.config.context != "auto" else tuple(
            c for c in CONTEXTS if c != "route" or len(names) >= MIN_ROUTE_SECTIONS))
        scores, curves, folds = {}, {}, {}
        for context in contexts:
            curves[context], folds[context] = self._loso_curve(sections, context)
            scores[context] = float(max(curves[context].values()))
        best = max(contexts, key=lambda c: scores[c])  # ties: the first listed ("spot")
        curve = curves[best]
        epoch = max(curve, key=lambda e: (curve[e], -e))  # ties: the fewest epochs
        self.config = replace(self.config, context=best)
        self.validation = {
            "section": "leave-one-section-out", "context": best,
            "context_scores": scores, "best_epoch": epoch, "mean_pearson": float(curve[epoch]),
            "per_section": {n: float(folds[best][n][epoch]) for n in names},
            "curve": {int(e): round(float(v), 5) for e, v in curve.items()},
        }
        logger.info("nucleus model: context %s, %d epochs, leave-one-section-out mean r %.3f",
                    best, epoch, curve[epoch])
        train = [sections[n] for n in names]
        self._pca = self._fit_pca(train)
        if best == "route":
            self._route = _fit_route(train)
            train = _with_priors(train)
        self._net = self._train(train, self._pca, best, epoch)[0]
        self.epochs = epoch
        self._set_count_scale(train)
        return self

    def _loso_curve(self, sections: dict, context: str):
        """Mean over held-out sections of the held-out spots' mean r: ``{epoch: r}``, and
        per section."""
        names = list(sections)
        per = {}
        for held in names:
            train = [sections[n] for n in names if n != held]
            pca = self._fit_pca(train)
            valid = sections[held]
            if context == "route":  # the held-out section's prior without it; cross-fitted
                valid = {**valid, "prior": _prior(_fit_route(train), valid)}
                train = _with_priors(train)
            _, history = self._train(train, pca, context, self.config.max_epochs,
                                     validation=(valid, pca))
            per[held] = history
        epochs = list(per[names[0]])
        curve = {e: float(np.mean([per[n][e] for n in names])) for e in epochs}
        return curve, {n: per[n] for n in names}

    def _train(self, sections: list[dict], pca, context: str, epochs: int, validation=None):
        torch = import_torch()
        before = torch.get_num_threads()
        # a small network: one thread is several times faster than two on a busy machine
        torch.set_num_threads(1)
        try:
            return self._train_loop(torch, sections, pca, context, epochs, validation)
        finally:
            torch.set_num_threads(before)

    def _train_loop(self, torch, sections, pca, context, epochs, validation):
        from ._nucleus_module import NucleusExpression

        cfg = self.config
        torch.manual_seed(int(cfg.seed))
        x, spot, y, priors, offset = [], [], [], [], 0
        for d in sections:
            inside = np.asarray(d["spot"]) >= 0
            x.append(self._inputs(d, pca, context, inside))
            spot.append(np.asarray(d["spot"])[inside] + offset)
            y.append(np.asarray(d["y"], dtype=np.float32))
            if context == "route":
                priors.append(_nucleus_prior(d, inside))
            offset += len(d["y"])
        x, spot = torch.from_numpy(np.vstack(x)), torch.from_numpy(np.concatenate(spot))
        prior = torch.from_numpy(np.vstack(priors)) if priors else None
        y_np = np.vstack(y)
        y = torch.from_numpy(y_np)
        scale = torch.from_numpy(np.maximum(y_np.std(0), 1e-3).astype(np.float32))
        props = None
        if self.types:
            props = torch.from_numpy(np.vstack([d["proportions"] for d in sections])
                                     .astype(np.float32))
        net = NucleusExpression(x.shape[1], len(self.genes), hidden=cfg.hidden,
                                latent=cfg.latent, dropout=cfg.dropout, n_types=len(self.types))
        if prior is None:
            share = np.expm1(y_np).mean(0) / 1e4  # mean share of each gene in a spot's total
            net.init_rates(torch.from_numpy(np.append(share, max(1.0 - share.sum(), 1e-3))
                                            .astype(np.float32)))
        else:
            net.init_offset()  # the untrained network predicts the route's profile
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        history = {}

        def score(epoch):
            d, vpca = validation
            pred = self._spot_prediction(net, d, vpca, context)
            history[epoch] = float(np.mean(pearson_per_gene(pred, d["y"])[0]))

        if validation is not None and prior is not None:
            score(0)  # the route itself
        for epoch in range(1, epochs + 1):
            net.train()
            opt.zero_grad()
            loss = net.loss(x, spot, offset, y, proportions=props, type_weight=cfg.type_weight,
                            scale=scale, offset=prior)
            loss.backward()
            opt.step()
            if validation is not None and epoch % cfg.eval_every == 0:
                score(epoch)
        net.eval()
        return net, history

    def _spot_prediction(self, net, d: dict, pca, context: str) -> np.ndarray:
        inside = np.asarray(d["spot"]) >= 0
        prior = _nucleus_prior(d, inside) if context == "route" else None
        mu, rest, _ = self._forward(net, self._inputs(d, pca, context, inside), prior)
        return spot_expression(mu, rest, np.asarray(d["spot"])[inside], len(d["y"]))

    @staticmethod
    def _forward(net, x: np.ndarray, prior: np.ndarray | None = None):
        torch = import_torch()
        net.eval()
        with torch.no_grad():
            mu, rest, logp = net(torch.from_numpy(np.asarray(x, dtype=np.float32)),
                                 None if prior is None else torch.from_numpy(prior))
        return (mu.numpy().astype(np.float64), rest.numpy().astype(np.float64),
                None if logp is None else logp.exp().numpy())

    def _set_count_scale(self, sections: list[dict]) -> None:
        totals, libraries = [], []
        for d in sections:
            spot = np.asarray(d["spot"])
            inside = spot >= 0
            prior = _nucleus_prior(d, inside) if self.config.context == "route" else None
            mu, rest, _ = self._forward(self._net, self._inputs(d, self._pca,
                                                                self.config.context, inside),
                                        prior)
            t = np.bincount(spot[inside], weights=mu.sum(1) + rest, minlength=len(d["y"]))
            totals.append(t)
            libraries.append(np.asarray(d["library"], dtype=np.float64))
        t, lib = np.concatenate(totals), np.concatenate(libraries)
        self.count_scale = float(lib[t > 0].mean() / t[t > 0].mean())

    # -- prediction ----------------------------------------------------------------------------
    def predict(self, desc: np.ndarray, features: np.ndarray, nearest: np.ndarray) -> dict:
        """Per-nucleus predictions of one section.

        Parameters
        ----------
        desc
            ``n_nuclei × n_desc`` descriptors z-scored over the section's nuclei.
        features
            ``n_spots × n_features`` spot tile features (standardised as in training).
        nearest
            ``n_nuclei`` index of each nucleus's nearest spot.

        Returns
        -------
        ``counts`` (``n_nuclei × n_genes`` expected counts per nucleus, ≥ 0), ``rest``
        (``n_nuclei`` expected counts of all other genes), ``types`` (``n_nuclei × n_types``
        probabilities, or None).

        Raises
        ------
        InputError
            If the model is not fitted or the widths differ from training.
        """
        if self._net is None:
            raise InputError("The nucleus model is not fitted.")
        n_desc = self._net.encoder[1].in_features - (len(self._pca[1]) if self.uses_context
                                                     else 0)
        desc = np.asarray(desc, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[1] != n_desc:
            raise InputError(f"Nucleus descriptors have shape {desc.shape}; the model expects "
                             f"n_nuclei × {n_desc}.")
        if self.uses_context and np.asarray(features).shape[1] != len(self._pca[0]):
            raise InputError(f"Spot features have {np.asarray(features).shape[1]} columns; "
                             f"the model expects {len(self._pca[0])}.")
        d = {"desc": desc, "features": features, "nearest": np.asarray(nearest)}
        prior = None
        if self.config.context == "route":
            d["prior"] = _prior(self._route, d)
            prior = _nucleus_prior(d, slice(None))
        mu, rest, types = self._forward(self._net, self._inputs(d, self._pca,
                                                                self.config.context), prior)
        return {"counts": mu * self.count_scale, "rest": rest * self.count_scale,
                "types": types}

    # -- I/O -----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the network, the context projection and the settings (one torch file)."""
        torch = import_torch()
        from ._trainer import atomic_torch_save

        state = {"format": FORMAT, "genes": self.genes, "types": self.types,
                 "config": asdict(self.config), "epochs": self.epochs,
                 "validation": self.validation, "count_scale": self.count_scale,
                 "n_inputs": self._net.encoder[1].in_features,
                 "pca": [np.asarray(a) for a in self._pca], "state": self._net.state_dict(),
                 "route": self._route}
        atomic_torch_save(torch, state, Path(path))

    @classmethod
    def load(cls, path, *, device: str = "cpu") -> NucleusPredictor:
        """Read what :meth:`save` wrote.

        Raises
        ------
        InputError
            If the file is not a nucleus model.
        """
        torch = import_torch()
        from ._nucleus_module import NucleusExpression

        state = torch.load(Path(path), map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise InputError(f"{path} is not a spotlens nucleus model.")
        self = cls(state["genes"], NucleusModelConfig(**state["config"]), types=state["types"])
        cfg = self.config
        self._net = NucleusExpression(state["n_inputs"], len(self.genes), hidden=cfg.hidden,
                                      latent=cfg.latent, dropout=cfg.dropout,
                                      n_types=len(self.types))
        self._net.load_state_dict(state["state"])
        self._net.eval()
        self._pca = tuple(np.asarray(a) for a in state["pca"])
        self.epochs, self.validation = int(state["epochs"]), dict(state["validation"])
        self.count_scale = float(state["count_scale"])
        self._route = state.get("route")  # absent in models saved before the "route" context
        return self


def _fit_route(sections: list[dict]):
    """The spot-level route on ``sections``: ridge, penalty and projection rank by
    leave-one-section-out (:class:`~spotlens.histology.RidgeBaseline`)."""
    from ._baseline import RidgeBaseline
    from ._rank import DEFAULT_RANKS

    return RidgeBaseline(ranks=DEFAULT_RANKS).fit(
        {str(i): d["features"] for i, d in enumerate(sections)},
        {str(i): d["y"] for i, d in enumerate(sections)})


def _prior(route, d: dict) -> np.ndarray:
    """A section's spots as log-rates: ``n_spots × (n_genes + 1)``, the route's predicted share
    of each gene in a spot's counts (``expm1(ŷ) / 1e4``, at least :data:`MIN_SHARE`) and of all
    other genes, logged — the decoder offset under which the spot's nuclei add up to ``ŷ``."""
    share = np.maximum(np.expm1(route.predict(d["features"])) / 1e4, MIN_SHARE)
    rest = np.maximum(1.0 - share.sum(1, keepdims=True), 1e-3)
    return np.log(np.hstack([share, rest])).astype(np.float32)


def _with_priors(sections: list[dict]) -> list[dict]:
    """Copies of ``sections`` with ``prior``: each from a route fitted on the others."""
    return [{**d, "prior": _prior(_fit_route([o for o in sections if o is not d]), d)}
            for d in sections]


def _nucleus_prior(d: dict, rows) -> np.ndarray:
    """The prior log-rates of the nuclei ``rows``: those of each one's nearest spot."""
    return np.asarray(d["prior"], dtype=np.float32)[np.asarray(d["nearest"])[rows]]


def spot_expression(counts: np.ndarray, rest: np.ndarray, spot: np.ndarray,
                    n_spots: int) -> np.ndarray:
    """``n_spots × n_genes`` ``log1p(1e4 · Σ_{i∈s} μ_i / Σ_{i∈s} t_i)`` (NumPy twin of
    :func:`~spotlens.histology._nucleus_module.aggregate_spots`); spots without nuclei are 0.

    ``counts``: ``n_nuclei × n_genes``; ``rest``: ``n_nuclei``; ``spot``: ``n_nuclei`` spot
    index (-1 = outside every spot: left out).
    """
    spot = np.asarray(spot)
    inside = spot >= 0
    summed = np.zeros((n_spots, counts.shape[1]))
    np.add.at(summed, spot[inside], counts[inside])
    total = summed.sum(1) + np.bincount(spot[inside], weights=rest[inside], minlength=n_spots)
    return np.log1p(1e4 * summed / np.where(total > 0, total, 1.0)[:, None])
