"""Where sidp keeps what it builds once and reuses: converted models, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SIDP_CACHE_DIR, else $XDG_CACHE_HOME/sidp, else ~/.cache/sidp."""
    if os.environ.get("SIDP_CACHE_DIR"):
        return Path(os.environ["SIDP_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sidp"
