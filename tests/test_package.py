"""Package-level facts: one version, recorded without importing the package face."""

from __future__ import annotations

import re
from pathlib import Path

import spotlens

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE).group(1)
    assert spotlens.__version__ == declared


def test_internal_modules_take_the_version_from_its_own_module():
    """``from .. import __version__`` would make a wing depend on the package face."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "src" / "spotlens").rglob("*.py")
        if "from .. import __version__" in path.read_text()
    ]
    assert offenders == []
