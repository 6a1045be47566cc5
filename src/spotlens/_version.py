"""The package version, in its own module so that internal modules need not import the package
face (``spotlens/__init__.py``) to record it. Kept equal to ``version`` in ``pyproject.toml``."""

__version__ = "0.1.0"
