"""Errors a user can cause with SAE files or encoder settings."""

from __future__ import annotations

from pathlib import Path


class SaeFormatError(ValueError):
    """An SAE artifact cannot be used. The message names the file, the key and the reason."""

    def __init__(self, path: Path | str, key: str | None, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        where = f"{self.path}: {key}" if key else self.path
        super().__init__(f"{where}: {reason}")
