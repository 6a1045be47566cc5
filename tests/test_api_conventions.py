"""Every public function follows the AnnData conventions of ``STYLE.md``, as scanpy tests its API.

Checked on the signatures (and, for "does it write", the docstring) of every function and public
method listed in the ``__all__`` of ``spotlens.io``, ``pp``, ``deconv``, ``pl``, ``datasets``,
``metrics`` and ``histology``. The conventions:

1. **AnnData first**: a function that needs an AnnData takes it as its first argument.
2. **Named by role**: ``adata``, or the role the data plays when that is what the function is
   about (``spatial``, ``reference``, ``cells``).
3. **Options keyword-only**: after the AnnData argument(s) everything is after ``*``.
4. **One mutation rule**: a function that writes results into its AnnData takes ``key_added``
   and ``inplace`` (default True, returns None; ``inplace=False`` returns the result and changes
   nothing) — or scanpy's ``copy`` (default False) — both keyword-only.
5. **Default keys from** ``spotlens._keys``; the field's names for inputs (``spatial_key``,
   ``labels_key``, ``library_key``, ``layer``), ``seed`` for randomness.

Deliberate exceptions are listed in :data:`EXCEPTIONS` with the reason; what the histology
restructuring (issue 14, points 2-3) is reshaping is in :data:`PENDING` as ``xfail``.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from spotlens import _keys

SUBPACKAGES = ("io", "pp", "deconv", "pl", "datasets", "metrics", "histology")
ROLE_NAMES = {"adata", "spatial", "reference", "cells"}
#: Names that mean one of the field's names; using them would make two spellings of one idea.
SYNONYMS = {
    "obsm_key": "spatial_key", "coords_key": "spatial_key", "coordinate_key": "spatial_key",
    "label_key": "labels_key", "cell_type_key": "labels_key", "celltype_key": "labels_key",
    "batch": "batch_key", "section_key": "library_key", "use_layer": "layer",
    "layer_key": "layer", "random_state": "seed", "random_seed": "seed", "key_add": "key_added",
    "output_key": "key_added", "out_key": "key_added",
}
WRITES_INTO_INPUT = re.compile(
    r"[Ww]rites? ``(?:adata|spatial|cells|reference)\.(?:obs|obsm|obsp|uns|layers|var|varm)\b"
)

#: (check, function) -> why this function departs from the convention on purpose.
EXCEPTIONS = {
    ("keyword_only", "deconv.cell_type_expression"): (
        "`genes` is what is asked for, required and without a default, as in "
        "sc.pl.violin(adata, keys)"),
    ("keyword_only", "pl.overlay"): (
        "`genes` is what is drawn, required and without a default, as in sc.pl.violin(adata, "
        "keys)"),
    ("keyword_only", "pl.prediction"): (
        "`gene` is what is drawn, required and without a default, as in sc.pl.violin(adata, "
        "keys) and pl.overlay"),
    ("keyword_only", "io.write_h5ad"): (
        "the destination path is the second positional argument, as in anndata's "
        "adata.write_h5ad(filename)"),
    ("keyword_only", "io.write_spatialdata"): (
        "the destination (a SpatialData object or .zarr store) is the second positional "
        "argument, as in io.write_h5ad and sdata.write(path)"),
    ("keyword_only", "pl.report"): (
        "the HTML file to write is the second positional argument, as in io.write_h5ad"),
    ("keyword_only", "histology.section_log_expression"): (
        "`genes` is what is computed, required and without a default"),
    ("keyword_only", "histology.spot_tiles"): (
        "the H&E image is a second data input, required, as squidpy's "
        "calculate_image_features(adata, img)"),
    ("writes_without_key_added", "pl.proportions"): (
        "plots keep the palette in uns[<key>_colors] as scanpy's plotting functions do; a stored "
        "palette is reused, never overwritten"),
    ("writes_without_key_added", "pl.cells"): (
        "plots keep the palette in uns[<color>_colors] as scanpy's plotting functions do"),
    ("writes_without_key_added", "pl.proportions_to_obs"): (
        "its one purpose is to copy proportions into obs columns for sc.pl.spatial; the columns "
        "are named by prefix + cell type and overwrite= guards existing ones"),
}

#: (check, function) -> what is pending; xfail(strict=False) until it lands.
PENDING: dict[tuple[str, str], str] = {}


def _public_callables():
    found = {}
    for sub in SUBPACKAGES:
        module = importlib.import_module(f"spotlens.{sub}")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                found[f"{sub}.{name}"] = (obj, False)
            elif inspect.isclass(obj) and obj.__module__.startswith("spotlens"):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        found[f"{sub}.{name}.{attr}"] = (member.__func__,
                                                         isinstance(member, classmethod))
                    elif inspect.isfunction(member):
                        found[f"{sub}.{name}.{attr}"] = (member, True)
    return found


CALLABLES = _public_callables()


def _parameters(qualname: str) -> list[inspect.Parameter]:
    func, bound = CALLABLES[qualname]
    params = list(inspect.signature(func).parameters.values())
    return params[1:] if bound else params


def _is_anndata(param: inspect.Parameter) -> bool:
    return "AnnData" in str(param.annotation) and "Mapping" not in str(param.annotation)


def _needs_anndata(qualname: str) -> bool:
    return any(_is_anndata(p) and p.default is inspect.Parameter.empty
               for p in _parameters(qualname))


def _cases(check: str, selected) -> list:
    out = []
    for qualname in sorted(selected):
        if (check, qualname) in EXCEPTIONS:
            continue
        if (check, qualname) in PENDING:
            out.append(pytest.param(qualname, marks=pytest.mark.xfail(
                reason=PENDING[check, qualname], strict=False)))
        else:
            out.append(qualname)
    return out


ANNDATA_FUNCTIONS = [q for q in CALLABLES if _needs_anndata(q)]


def test_the_scan_sees_the_api():
    assert {"deconv.deconvolve", "deconv.cell_level", "pl.proportions",
            "pp.reference_signatures"} <= set(ANNDATA_FUNCTIONS)
    for check, qualname in EXCEPTIONS:  # no stale exceptions (a pending entry may go away)
        assert qualname in CALLABLES, f"{qualname} is listed for {check!r} but is not public"


@pytest.mark.parametrize("qualname", _cases("anndata_first", ANNDATA_FUNCTIONS))
def test_anndata_comes_first(qualname):
    first = _parameters(qualname)[0]
    assert _is_anndata(first), f"{qualname}: first argument {first.name!r} is not an AnnData"


@pytest.mark.parametrize("qualname", _cases("role_names", ANNDATA_FUNCTIONS))
def test_anndata_arguments_are_named_by_role(qualname):
    names = [p.name for p in _parameters(qualname) if _is_anndata(p)]
    assert set(names) <= ROLE_NAMES, f"{qualname}: AnnData arguments {names}"


@pytest.mark.parametrize("qualname", _cases("keyword_only", ANNDATA_FUNCTIONS))
def test_options_after_the_data_are_keyword_only(qualname):
    positional = [p.name for p in _parameters(qualname)
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and not _is_anndata(p)]
    assert not positional, f"{qualname}: {positional} should come after `*`"


@pytest.mark.parametrize("qualname", _cases("mutation_rule", CALLABLES))
def test_writers_take_key_added_and_inplace_or_copy(qualname):
    params = {p.name: p for p in _parameters(qualname)}
    func, _ = CALLABLES[qualname]
    if "key_added" not in params and "inplace" not in params and "copy" not in params:
        return
    assert "key_added" in params, f"{qualname}: inplace/copy without key_added"
    assert ("inplace" in params) != ("copy" in params), f"{qualname}: exactly one of inplace, copy"
    for name in ("key_added", "inplace", "copy"):
        if name in params:
            assert params[name].kind is params[name].KEYWORD_ONLY, f"{qualname}: {name}"
    if "inplace" in params:
        assert params["inplace"].default is True
        returns = str(inspect.signature(func).return_annotation)
        assert "None" in returns, f"{qualname}: inplace=True must return None, got {returns}"
    else:
        assert params["copy"].default is False


@pytest.mark.parametrize("qualname", _cases("writes_without_key_added", CALLABLES))
def test_documented_writers_follow_the_mutation_rule(qualname):
    func, _ = CALLABLES[qualname]
    if WRITES_INTO_INPUT.search(inspect.getdoc(func) or ""):
        names = {p.name for p in _parameters(qualname)}
        assert "key_added" in names and names & {"inplace", "copy"}, (
            f"{qualname} writes into its input but takes no key_added/inplace"
        )


def _keys_defaults() -> set[str]:
    values = {v for k, v in vars(_keys).items() if k.isupper() and isinstance(v, str)}
    for name, builder in vars(_keys).items():
        if name.endswith("_key") and callable(builder):
            try:
                values.add(builder())
            except TypeError:  # builders that need a key_added
                pass
    return values


@pytest.mark.parametrize("qualname", _cases("default_keys", CALLABLES))
def test_default_keys_come_from_the_keys_module(qualname):
    allowed = _keys_defaults()
    for p in _parameters(qualname):
        if p.name in ("key_added", "key", "spatial_key") and isinstance(p.default, str):
            assert p.default in allowed, f"{qualname}: {p.name}={p.default!r} not from _keys"


@pytest.mark.parametrize("qualname", _cases("field_names", CALLABLES))
def test_parameters_use_the_field_names(qualname):
    bad = {p.name: SYNONYMS[p.name] for p in _parameters(qualname) if p.name in SYNONYMS}
    assert not bad, f"{qualname}: use {bad}"
