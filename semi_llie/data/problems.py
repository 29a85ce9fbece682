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

    def __reduce__(self) -> tuple[object, tuple[type, tuple[str, ...], str, str]]:
        # Build workers return these to the parent: the default pickling would call __init__ with the
        # message alone, fail in the pool's result thread and leave the build waiting forever.
        return _restore, (type(self), self.paths, self.reason, str(self))

    def record(self) -> dict[str, object]:
        """The manifest's entry for a skipped input."""
        return {"paths": list(self.paths), "reason": self.reason}


def _restore(cls: type, paths: tuple[str, ...], reason: str, message: str) -> SkippableInputError:
    """Unpickle a SkippableInputError (or subclass) without calling its __init__."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.paths, error.reason = paths, reason
    return error
