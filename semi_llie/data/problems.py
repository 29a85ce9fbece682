"""Input problems that `--skip-bad` may skip (recorded in the manifest) instead of stopping the build."""

from __future__ import annotations

from pathlib import Path

from semi_llie.errors import UserError


class SkippableInputError(UserError):
    """A file (or pair of files) that cannot become a sample; the message names every file involved."""

    def __init__(self, paths: list[Path] | tuple[Path, ...], reason: str) -> None:
        self.paths = tuple(str(p) for p in paths)
        self.reason = reason
        super().__init__(f"{reason}; fix or remove the file, or pass --skip-bad to skip it")

    def record(self) -> dict[str, object]:
        """The manifest's entry for a skipped input."""
        return {"paths": list(self.paths), "reason": self.reason}
