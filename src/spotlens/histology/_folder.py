"""The model folder: its ``config.json`` schema (frozen dataclasses) and its files.

A folder written by :func:`~spotlens.histology.train` (or :meth:`HistologyModel.save`) holds

- ``config.json`` (:class:`ModelConfig`): format tag, spotlens version, model type and file,
  the network settings (:class:`~spotlens.histology.TrainConfig` as a dict, None for ridge),
  seed, encoder (:class:`EncoderSpec`), tile geometry (:class:`TileSettings`: µm, px, µm/px,
  scales, spot pitch), target genes and the rule that chose them, the training sections
  (:class:`SectionRecord`), the held-out validation scores and the uncertainty ensemble's
  record (``uncertainty``: file, method, members; None when the folder has none);
- the predictor's file, named by the model type (``model.pt`` for a network,
  ``model.npz`` for ridge; see ``_registry.py``);
- ``uncertainty.npz``: the block-bootstrap ensemble of ridge heads whose spread is the
  per-spot, per-gene uncertainty of predictions (``_uncertainty.py``); folders written before
  it existed lack it (and ``config.json["uncertainty"]``) and predict without uncertainty;
- while (and after) training a network: ``checkpoint.pt``, ``checkpoint-final.pt`` and
  ``checkpoint.json`` (:class:`CheckpointSidecar`), so an interrupted run resumes.

The JSON layout is that of format ``spotlens.histology.model/1`` since its first release:
older folders (without ``scales``, ``standardize``, ``identity`` or ``spot_pitch_px``) read
with the defaults those keys had. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._validation import InputError
from ..io import atomic_path

FORMAT = "spotlens.histology.model/1"
CONFIG_FILE = "config.json"
SIDECAR_FILE = "checkpoint.json"
PROBE_CHECKPOINT = "checkpoint.pt"
FINAL_CHECKPOINT = "checkpoint-final.pt"
COLOUR_ENCODER = "colour"


@dataclass(frozen=True)
class EncoderSpec:
    """The tile encoder a model reads features of.

    Attributes
    ----------
    name
        Encoder name (``"colour"`` for the 25 colour statistics; the trunk's name when the
        model fine-tuned the encoder's head).
    argument
        What was passed as ``encoder=`` (a name or a TorchScript file).
    weights_id
        Identity of the weights (SHA-256 based); checked again at prediction.
    dim
        Features per tile and scale.
    input_size, identity
        Tile side the encoder reads (px) and its input identity (px | mean | std).
    weights_path
        Absolute path of the checkpoint of a named architecture, or None.
    head
        With a fine-tuned head: ``dim``, ``channels``, ``cells`` and the ``base`` encoder.
    """

    name: str
    argument: str
    weights_id: str
    dim: int
    input_size: int | None = None
    identity: str | None = None
    weights_path: str | None = None
    head: Mapping[str, Any] | None = None

    def to_dict(self) -> dict:
        """The ``config.json["encoder"]`` dict (keys of unset optional fields left out)."""
        return {k: v for k, v in asdict(self).items()
                if v is not None or k in ("name", "argument", "weights_id", "dim")}

    @property
    def width(self) -> int:
        """Features per tile scale the model reads: the head's width, or the encoder's."""
        return int(self.head["dim"] if self.head is not None else self.dim)


@dataclass(frozen=True)
class TileSettings:
    """How tiles are cut and their features scaled, in µm, px and µm/px.

    Attributes
    ----------
    tile_um
        Mean scale-1 tile side over the training sections, µm (None: scale unknown).
    tile_um_argument
        ``tile_um`` as passed to :func:`train` (None: each section's spot diameter).
    tile_px
        Mean scale-1 tile side, full-resolution px of the training scans.
    scales
        Tile sides as multiples of the scale-1 tile.
    standardize
        ``"section"`` (features z-scored within each section) or ``"none"``.
    out_px
        Tile side after resizing, px.
    mpp
        Mean µm per full-resolution px of the training scans.
    spot_pitch_um, spot_pitch_px
        Median spot pitch of the training sections, µm and px (None/NaN when unknown).
    """

    tile_um: float | None
    tile_px: float
    out_px: int
    mpp: float | None
    tile_um_argument: float | None = None
    scales: tuple[float, ...] = (1.0,)
    standardize: str = "none"
    spot_pitch_um: float | None = None
    spot_pitch_px: float | None = None

    def to_dict(self) -> dict:
        """The ``config.json["tiles"]`` dict."""
        d = asdict(self)
        d["scales"] = list(self.scales)
        order = ("tile_um", "tile_um_argument", "tile_px", "scales", "standardize", "out_px",
                 "mpp", "spot_pitch_um", "spot_pitch_px")
        return {k: d[k] for k in order}


@dataclass(frozen=True)
class SectionRecord:
    """One training section: ``name``, ``image`` path, ``n_spots``, ``mpp`` (µm/px) and where
    it came from (``mpp_source``), scale-1 ``tile_px`` and ``image_check_r`` (agreement with
    the section's stored image, None when it stores none)."""

    name: str
    image: str
    n_spots: int
    mpp: float | None = None
    mpp_source: str | None = None
    tile_px: float | None = None
    image_check_r: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The parsed ``config.json`` of a model folder (see the module docstring).

    Attributes
    ----------
    model_type
        A key of :data:`~spotlens.histology._registry.MODEL_TYPES`.
    model_file
        The predictor's file in the folder.
    encoder, tiles
        :class:`EncoderSpec` and :class:`TileSettings`.
    genes
        Target genes, in the order of the predictions' columns.
    gene_rule
        ``"hvg"``, ``"top_expressed"`` or ``"list"``.
    sections
        :class:`SectionRecord` of each training section.
    validation
        The held-out scores the settings were chosen on (see :func:`train`).
    train_config
        The network's :class:`~spotlens.histology.TrainConfig` as a dict; None for ridge.
    seed
        Seed of the initialisation and dropout.
    spotlens_version
        The version that wrote the folder.
    uncertainty
        The uncertainty ensemble: ``file`` (``"uncertainty.npz"``), ``method``, ``n_boot``
        (members), ``block_spacings`` (bootstrap tile side, in spot spacings), ``alpha``,
        ``seed``; None = the folder has none (written before spotlens stored one, or
        trained with ``n_bootstrap=0``).
    """

    model_type: str
    model_file: str
    encoder: EncoderSpec
    tiles: TileSettings
    genes: tuple[str, ...]
    gene_rule: str = "list"
    sections: tuple[SectionRecord, ...] = ()
    validation: Mapping[str, Any] | None = None
    train_config: Mapping[str, Any] | None = None
    seed: int = 0
    spotlens_version: str = ""
    uncertainty: Mapping[str, Any] | None = None
    format: str = field(default=FORMAT)

    def to_dict(self) -> dict:
        """The ``config.json`` dict (plain JSON types)."""
        return {
            "format": self.format,
            "spotlens_version": self.spotlens_version,
            "model_type": self.model_type,
            "model_file": self.model_file,
            "train_config": None if self.train_config is None else dict(self.train_config),
            "seed": int(self.seed),
            "encoder": self.encoder.to_dict(),
            "tiles": self.tiles.to_dict(),
            "genes": list(self.genes),
            "gene_rule": self.gene_rule,
            "sections": [asdict(s) for s in self.sections],
            "validation": None if self.validation is None else dict(self.validation),
            "uncertainty": None if self.uncertainty is None else dict(self.uncertainty),
        }

    @classmethod
    def from_dict(cls, d: Mapping, *, where: str = "config.json") -> ModelConfig:
        """Parse a ``config.json`` dict (any version of format 1).

        Raises
        ------
        InputError
            If it is not a spotlens histology model config, or misses a required key.
        """
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise InputError(f"{where} is not a spotlens histology model config ({FORMAT}).")
        try:
            tiles = dict(d["tiles"])
            tiles["scales"] = tuple(float(s) for s in tiles.get("scales", (1.0,)))
            return cls(
                model_type=d["model_type"], model_file=d["model_file"],
                encoder=EncoderSpec(**_known(EncoderSpec, d["encoder"])),
                tiles=TileSettings(**_known(TileSettings, tiles)),
                genes=tuple(d["genes"]), gene_rule=d.get("gene_rule", "list"),
                sections=tuple(SectionRecord(**_known(SectionRecord, s))
                               for s in d.get("sections", ())),
                validation=d.get("validation"), train_config=d.get("train_config"),
                seed=int(d.get("seed", 0)), spotlens_version=d.get("spotlens_version", ""),
                uncertainty=d.get("uncertainty"),
            )
        except (KeyError, TypeError) as err:
            raise InputError(f"{where} is incomplete or damaged ({err!r}).") from err

    def write(self, folder: Path) -> Path:
        """Write ``folder/config.json`` atomically; return its path."""
        path = Path(folder) / CONFIG_FILE
        write_json(self.to_dict(), path)
        return path

    @classmethod
    def read(cls, folder: Path) -> ModelConfig:
        """Read ``folder/config.json``.

        Raises
        ------
        InputError
            If the file is missing, unreadable or not a spotlens histology model config.
        """
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise InputError(f"{folder} is not a spotlens histology model: no {CONFIG_FILE} in "
                             "it.")
        return cls.from_dict(read_json(path), where=str(path))


def _known(cls, d: Mapping) -> dict:
    """The entries of ``d`` that are fields of dataclass ``cls`` (later keys are ignored)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in dict(d).items() if k in names}


@dataclass(frozen=True)
class CheckpointSidecar:
    """``checkpoint.json``: which run the checkpoints belong to, and the refit's epochs."""

    fingerprint: str
    final_epochs: int | None = None

    def write(self, folder: Path) -> None:
        write_json(asdict(self), Path(folder) / SIDECAR_FILE)

    @classmethod
    def read(cls, folder: Path) -> CheckpointSidecar | None:
        d = read_json(Path(folder) / SIDECAR_FILE)
        if not isinstance(d, Mapping) or "fingerprint" not in d:
            return None
        return cls(d["fingerprint"], d.get("final_epochs"))


def fingerprint(**parts) -> str:
    """SHA-256 of the JSON of ``parts`` (sorted keys): the identity of a training run."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_dir(path, *, create: bool = False) -> Path:
    """Return ``path`` as a model folder path (created with ``create``).

    Raises
    ------
    InputError
        If ``path`` is a file, or cannot be created.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"The model path {path} is a file; a model is a folder.")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"Cannot create the model folder {path} ({err.strerror}).") from err
    return path


def write_json(obj: dict, path: Path) -> None:
    """Write ``obj`` as indented JSON, atomically (NumPy scalars and arrays, paths allowed)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
