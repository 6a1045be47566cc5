"""Errors in the command line's terms: API parameter names in a message become CLI flags.

The library's errors name the fix as Python (``Pass labels_key= naming the column``,
``layer='counts'``, ``device='cpu'``, ``lower min_cells_per_type``). The command line catches
them and rewrites each parameter the running command has an option for, using the command's
own options (click's ``params``), so the table cannot drift from the flags:

=========================================  ==========================================
API (library message)                      command line (rewritten)
=========================================  ==========================================
``labels_key=``                            ``--labels-key``
``layer='counts'``                         ``--layer counts`` (``--reference-layer
                                           counts`` when the message is about the
                                           reference)
``Pass layer=None`` / ``leave bin_size=None``  ``Leave out --layer`` / ``leave out --bin-size``
``use_attention=False``                    ``--no-attention``
``min_cells_per_type`` (a bare name)       ``--min-cells-per-type``
``adata.raw.to_adata()``                   ``--layer raw`` (counts held in ``.raw``)
=========================================  ==========================================

Parameters the command has no option for are left as they are.
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from typing import Any

#: API parameter names whose command-line option has another name. ``model=`` of
#: ``histology.train`` is the architecture (``--model-type``); ``--model`` of ``histology
#: evaluate|predict`` is the model folder, ``model_dir`` of the API.
ALIASES = {"use_attention": "attention", "model": "model_type", "model_dir": "model"}

#: How an option spells the API's ``None`` when it has a word for it (else: leave it out).
NONE_SPELLING = {"n_genes_per_type": "all", "expression_rank": "full"}

_VALUE = r"""'[^']*'|"[^"]*"|None|True|False|-?\d+(?:\.\d+)?(?:e-?\d+)?"""
_NAME = re.compile(
    rf"""(?<![\w.'"\[/-])(?P<name>[a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?P<eq>=(?P<value>{_VALUE})?)?"""
    r"""(?![\w'"(\[])"""
)
_LEAVE = re.compile(r"\b(?P<verb>[Pp]ass|[Ll]eave|[Uu]se|[Ss]et)\s+"
                    r"(?P<name>[a-z][a-z0-9_]*)=None\b")
_ECHO = re.compile(
    r"\s*\((?:CLI:\s*)?(?P<flag>--[a-z0-9-]+)(?:\s+[A-Z]+)?(?: on the command line)?\)"
)
_ECHO_LEAD = re.compile(r"\((?P<flag>--[a-z0-9-]+),\s*")


@dataclass(frozen=True)
class _Flag:
    name: str  # the long flag, e.g. "--labels-key"
    off: str | None = None  # the negative of a boolean flag, e.g. "--no-attention"
    is_flag: bool = False


def current_context() -> Any:
    """The click context of the running command, or None outside a command.

    Recent typer runs on its own copy of click (``typer._click``), older typer on click
    itself; either may hold the context.
    """
    for module in ("typer._click.globals", "click"):
        try:
            get = importlib.import_module(module).get_current_context
        except (ImportError, AttributeError):
            continue
        ctx = get(silent=True)
        if ctx is not None:
            return ctx
    return None


def cli_message(message: str, command: Any = None) -> str:
    """Rewrite the API parameters in ``message`` as the options of ``command``.

    Parameters
    ----------
    message
        An :class:`~spotlens.InputError` (or backend error) message from the library.
    command
        The running (typer/click) command; ``None`` uses the current context's command, and
        without one the message is returned unchanged.

    Returns
    -------
    The message with ``name=value`` as ``--flag value``, ``name=None`` as "leave out
    ``--flag``", bare snake_case parameter names as ``--flag`` and ``adata.raw.to_adata()`` as
    ``--layer raw``, for every parameter ``command`` has an option for.

    Examples
    --------
    >>> cli_message("Pass labels_key= naming the column.", command)  # doctest: +SKIP
    'Pass --labels-key naming the column.'
    """
    if command is None:
        ctx = current_context()
        command = ctx.command if ctx is not None else None
    if command is None:
        return message
    flags = _flags(command)
    if not flags:
        return message
    about_reference = _about_reference(message)

    def flag_of(name: str) -> _Flag | None:
        if name == "layer" and about_reference and "reference_layer" in flags:
            name = "reference_layer"
        return flags.get(ALIASES.get(name, name))

    def leave_out(match: re.Match) -> str:
        name = match["name"]
        flag = flag_of(name)
        if flag is None or name in NONE_SPELLING:
            return match[0]
        verb = "Leave" if match["verb"][0].isupper() else "leave"
        return f"{verb} out {flag.name}"

    def rewrite(match: re.Match) -> str:
        name, eq, value = match["name"], match["eq"], match["value"]
        flag = flag_of(name)
        if flag is None or (eq is None and "_" not in name):
            return match[0]  # a plain word ("layer", "device") is left to the prose
        if not value:
            return flag.name
        if value == "None":
            return f"{flag.name} {NONE_SPELLING[name]}" if name in NONE_SPELLING \
                else f"no {flag.name}"
        if value in ("True", "False"):
            if flag.is_flag:
                return flag.name if value == "True" else (flag.off or f"no {flag.name}")
            value = value.lower()
        value = value[1:-1] if value[0] in "'\"" else value
        if value == "...":
            value = name.rsplit("_", 1)[-1].upper()
        return f"{flag.name} {shlex.quote(value)}"

    text = _LEAVE.sub(leave_out, message)
    text = _NAME.sub(rewrite, text)
    layer = flag_of("layer")
    if layer is not None:
        text = text.replace("adata.raw.to_adata()", f"{layer.name} raw (the counts in .raw)")
    if "client=" in text:  # the command line never runs on a Dask cluster
        text = re.sub(r"\s+without client=", "", text)
    # "--cells-per-spot (--cells-per-spot on the command line)" -> "--cells-per-spot"
    text = _ECHO.sub(lambda m: "" if text.count(m["flag"]) > 1 else m[0], text)
    # "pass --mpp (--mpp, µm per px)" -> "pass --mpp (µm per px)"
    text = _ECHO_LEAD.sub(lambda m: "(" if text.count(m["flag"]) > 1 else m[0], text)
    return text.replace(" or None to ", " or leave the option out to ")


def _flags(command: Any) -> dict[str, _Flag]:
    """API-style parameter name -> flag, from the command's own click options."""
    out = {}
    for param in getattr(command, "params", ()):
        if getattr(param, "param_type_name", None) != "option" or not param.name:
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        if not longs:
            continue
        off = next((o for o in param.secondary_opts if o.startswith("--")), None)
        out[param.name] = _Flag(longs[0], off, bool(param.is_flag))
    return out


def _about_reference(message: str) -> bool:
    """Whether the message is about the reference rather than the spatial data."""
    ref = re.search(r"\breference\b", message, flags=re.IGNORECASE)
    spatial = re.search(r"\bspatial (?:data|counts)\b", message, flags=re.IGNORECASE)
    return ref is not None and (spatial is None or ref.start() < spatial.start())
