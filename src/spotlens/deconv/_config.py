"""Settings of the deconvolution methods: one frozen dataclass each, validated in one place.

:class:`DeconvolutionConfig` holds every setting of :func:`spotlens.deconv.deconvolve` that is
about the method (not where the data sit, nor how the run is shown): the graph, the penalties,
the likelihood, the signatures, the solver, with the settings that apply in one mode only
grouped (:class:`AttentionSettings`, :class:`CVSettings`, :class:`DaskSettings`).
:class:`CellLevelConfig` does the same for :func:`spotlens.deconv.cell_level`. The API builds
them from its keyword arguments, the CLI from a JSON or TOML file plus its flags, and both write
:meth:`DeconvolutionConfig.flat` to ``uns[key_added]["params"]``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .._validation import InputError, check_int, check_number

LIKELIHOODS = ("auto", "quasi_poisson", "poisson", "gaussian")
GENE_WEIGHTS = ("poisson", "none")


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings in a ``.json`` or ``.toml`` file, as a dict.

    Raises
    ------
    InputError
        The file is missing, has another suffix, or does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Config file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise InputError(f"Config file {str(path)!r}: use a .json or .toml file of settings.")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"Config file {str(path)!r} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"Config file {str(path)!r} must hold a table of settings.")
    return data


def _check_penalty(name: str, value) -> float | str:
    if isinstance(value, str) and value == "auto":
        return value
    return check_number(name, value, at_least=0, expected="a number ≥ 0 or 'auto'")


@dataclass(frozen=True)
class AttentionSettings:
    """Expression similarity in the spot graph's edges (``W_ij = exp(−α d²) · Attn``).

    Attributes
    ----------
    enabled
        Weight edges by the attention between the two spots' expression; ``False`` uses
        distance only.
    temperature
        Softmax temperature of the attention (larger: flatter weights).
    update_every
        Rebuild the attention from the current proportions every this many sweeps (``None``:
        from expression only, once).
    n_comps
        Principal components of log expression that the attention compares.
    """

    enabled: bool = True
    temperature: float = 1.0
    update_every: int | None = None
    n_comps: int = 20

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise InputError(f"use_attention must be True or False, got {self.enabled!r}.")
        check_number("attention_temperature", self.temperature, above=0, finite=False,
                     expected="> 0")
        check_int("attention_update_every", self.update_every, minimum=1, none_ok=True,
                  expected="a positive integer or None")
        check_int("n_comps", self.n_comps, minimum=1)


@dataclass(frozen=True)
class CVSettings:
    """Cross-validation by count splitting, used where a penalty is ``"auto"``.

    Attributes
    ----------
    folds
        Parts each spot's counts are split into.
    max_spots
        Largest contiguous patch of spots the penalties are chosen on; ``None``: 2,000 spots
        under the count likelihood, 5,000 under least squares.
    """

    folds: int = 2
    max_spots: int | None = None

    def __post_init__(self):
        check_int("cv_folds", self.folds, minimum=2)
        check_int("cv_max_spots", self.max_spots, minimum=100, none_ok=True,
                  expected="an integer ≥ 100, or None (by likelihood)")


@dataclass(frozen=True)
class DaskSettings:
    """Tiling of a fit on a Dask cluster (used only with ``client=``).

    Attributes
    ----------
    tile_size
        Side of the square tiles, in the units of the coordinates (``None``: about 50,000
        spots a tile).
    halo_hops
        Graph hops of neighbours solved with each tile and discarded (``None``: from the
        spatial penalty).
    """

    tile_size: float | None = None
    halo_hops: int | None = None

    def __post_init__(self):
        check_number("tile_size", self.tile_size, above=0, none_ok=True,
                     expected="a number > 0 (coordinate units), or None")
        check_int("halo_hops", self.halo_hops, minimum=0, none_ok=True)


#: Flat keyword name → (group, field) of the grouped settings.
_GROUPED = {
    "use_attention": ("attention", "enabled"),
    "attention_temperature": ("attention", "temperature"),
    "attention_update_every": ("attention", "update_every"),
    "n_comps": ("attention", "n_comps"),
    "cv_folds": ("cv", "folds"),
    "cv_max_spots": ("cv", "max_spots"),
    "tile_size": ("dask", "tile_size"),
    "halo_hops": ("dask", "halo_hops"),
}
_GROUP_TYPES = {"attention": AttentionSettings, "cv": CVSettings, "dask": DaskSettings}


@dataclass(frozen=True)
class DeconvolutionConfig:
    """The method settings of :func:`spotlens.deconv.deconvolve` (see it for each one).

    Build it with keywords (``DeconvolutionConfig(lambda_spatial=0.1)``), from the flat
    keyword names of :func:`~spotlens.deconv.deconvolve` (:meth:`from_dict`, which also takes
    the grouped form of :meth:`to_dict`) or from a JSON/TOML file (:meth:`from_file`).
    Every value is checked when the object is made.

    Raises
    ------
    InputError
        A value out of range, or an unknown setting name.

    Examples
    --------
    >>> from spotlens.deconv import DeconvolutionConfig
    >>> cfg = DeconvolutionConfig.from_dict({"lambda_spatial": 0.1, "use_attention": False})
    >>> cfg.lambda_spatial, cfg.attention.enabled
    (0.1, False)
    """

    k_neighbors: int = 6
    alpha: float | None = None
    lambda_ridge: float | Literal["auto"] = "auto"
    lambda_spatial: float | Literal["auto"] = "auto"
    likelihood: Literal["auto", "quasi_poisson", "poisson", "gaussian"] = "auto"
    gene_weights: Literal["poisson", "none"] = "poisson"
    fit_quality: bool | Literal["auto"] = "auto"
    n_genes_per_type: int | None = 200
    min_cells_per_type: int = 5
    cells_per_state: int | None = 50
    max_states_per_type: int = 5
    min_shared_genes: int = 10
    n_iter: int = 200
    tol: float | None = None
    seed: int = 0
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    cv: CVSettings = field(default_factory=CVSettings)
    dask: DaskSettings = field(default_factory=DaskSettings)

    def __post_init__(self):
        check_int("k_neighbors", self.k_neighbors, minimum=1, expected="a positive integer")
        object.__setattr__(self, "lambda_ridge", _check_penalty("lambda_ridge",
                                                                self.lambda_ridge))
        object.__setattr__(self, "lambda_spatial", _check_penalty("lambda_spatial",
                                                                  self.lambda_spatial))
        check_number("alpha", self.alpha, above=0, none_ok=True,
                     expected="> 0 or None (automatic)")
        if self.likelihood not in LIKELIHOODS:
            raise InputError(
                "likelihood must be 'auto', 'quasi_poisson', 'poisson' or 'gaussian', got "
                f"{self.likelihood!r}."
            )
        if self.gene_weights not in GENE_WEIGHTS:
            raise InputError(
                f"gene_weights must be 'poisson' or 'none', got {self.gene_weights!r}."
            )
        if self.fit_quality not in ("auto", True, False):
            raise InputError(
                f"fit_quality must be True, False or 'auto', got {self.fit_quality!r}."
            )
        check_int("n_genes_per_type", self.n_genes_per_type, minimum=1, none_ok=True,
                  expected="a positive integer or None (every expressed gene)")
        check_int("min_cells_per_type", self.min_cells_per_type, minimum=1)
        check_int("cells_per_state", self.cells_per_state, minimum=1, none_ok=True,
                  expected="a positive integer or None (one state per type)")
        check_int("max_states_per_type", self.max_states_per_type, minimum=1)
        check_int("min_shared_genes", self.min_shared_genes, minimum=1)
        check_int("n_iter", self.n_iter, minimum=1, expected="a positive integer")
        check_number("tol", self.tol, above=0, finite=False, none_ok=True,
                     expected="> 0, or None (by likelihood)")
        check_int("seed", self.seed, minimum=0, expected="an integer ≥ 0")
        for name, kind in _GROUP_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"{name} must be a {kind.__name__}, got "
                                 f"{type(getattr(self, name)).__name__}.")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> DeconvolutionConfig:
        """Config from setting names: the flat keywords of ``deconvolve`` (``cv_folds``) or
        the grouped form of :meth:`to_dict` (``{"cv": {"folds": 3}}``); missing ones keep
        their defaults."""
        if not isinstance(settings, dict):
            raise InputError(f"settings must be a dict, got {type(settings).__name__}.")
        top = {f.name for f in fields(cls)}
        plain, groups = {}, {name: {} for name in _GROUP_TYPES}
        unknown = []
        for name, value in settings.items():
            if name in _GROUP_TYPES:
                if not isinstance(value, dict):
                    raise InputError(f"{name!r} must be a table of settings, got {value!r}.")
                valid = {f.name for f in fields(_GROUP_TYPES[name])}
                unknown += [f"{name}.{k}" for k in value if k not in valid]
                groups[name].update(value)
            elif name in _GROUPED:
                group, key = _GROUPED[name]
                groups[group][key] = value
            elif name in top:
                plain[name] = value
            else:
                unknown.append(name)
        if unknown:
            raise InputError(
                f"Unknown deconvolution setting(s): {', '.join(sorted(unknown))}. Valid names: "
                f"{', '.join(sorted(cls.setting_names()))}."
            )
        built = {name: _GROUP_TYPES[name](**values) for name, values in groups.items()}
        return cls(**plain, **built)

    @classmethod
    def from_file(cls, path: str | Path) -> DeconvolutionConfig:
        """Config from a ``.json`` or ``.toml`` file of settings (as :meth:`from_dict`); a
        ``cell_level`` table in it is for :class:`CellLevelConfig` and is ignored here."""
        data = read_settings(path)
        data.pop("cell_level", None)
        return cls.from_dict(data)

    @classmethod
    def setting_names(cls) -> list[str]:
        """The flat setting names (the keywords of ``deconvolve``) a config holds."""
        return [f.name for f in fields(cls) if f.name not in _GROUP_TYPES] + list(_GROUPED)

    def to_dict(self) -> dict[str, Any]:
        """Grouped settings as plain Python values (``from_dict`` reads them back)."""
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Settings under the keyword names of ``deconvolve`` (``cv_folds``, not ``cv.folds``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _GROUP_TYPES}
        for name, (group, key) in _GROUPED.items():
            out[name] = getattr(getattr(self, group), key)
        return out

    def updated(self, **settings) -> DeconvolutionConfig:
        """A copy with some settings changed, by their flat names (checked as on creation)."""
        merged = self.flat()
        merged.update(settings)
        return self.from_dict(merged) if settings else replace(self)


@dataclass(frozen=True)
class CellLevelConfig:
    """The method settings of :func:`spotlens.deconv.cell_level` (see it for each one).

    Raises
    ------
    InputError
        A value out of range.
    """

    n_candidates: int = 10
    lambda_type: float = 0.03
    lambda_similar: float = 0.0
    lambda_ridge: float = 1e-3
    max_cells: int = 200_000
    n_iter: int = 100
    tol: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name, low in (("n_candidates", 1), ("max_cells", 10), ("n_iter", 1)):
            check_int(name, getattr(self, name), minimum=low)
        for name in ("lambda_type", "lambda_similar", "lambda_ridge", "tol"):
            check_number(name, getattr(self, name), at_least=0, finite=False,
                         expected="a number ≥ 0")
        check_int("seed", self.seed, minimum=0, expected="an integer ≥ 0")

    def to_dict(self) -> dict[str, Any]:
        """Settings as plain Python values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> CellLevelConfig:
        """Config from setting names (the keywords of ``cell_level``); others are refused."""
        if not isinstance(settings, dict):
            raise InputError(f"cell_level settings must be a table, got {settings!r}.")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - valid)
        if unknown:
            raise InputError(
                f"Unknown cell-level setting(s): {', '.join(unknown)}. Valid names: "
                f"{', '.join(sorted(valid))}."
            )
        return cls(**settings)

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int | None = None) -> CellLevelConfig:
        """Config from the ``cell_level`` table of a ``.json``/``.toml`` settings file;
        ``seed`` (e.g. the deconvolution's) is used where the table sets none."""
        table = dict(read_settings(path).get("cell_level", {}))
        if seed is not None:
            table.setdefault("seed", seed)
        return cls.from_dict(table)


__all__ = [
    "AttentionSettings",
    "CVSettings",
    "CellLevelConfig",
    "DaskSettings",
    "DeconvolutionConfig",
]
