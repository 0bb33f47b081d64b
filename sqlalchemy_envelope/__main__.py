"""``python -m sqlalchemy_envelope``: the same command line as ``sqlalchemy-envelope``."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
