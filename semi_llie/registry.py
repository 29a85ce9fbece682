"""Tiny `type:`-keyed registries (BasicSR style, without import-time discovery).

    MODELS = Registry("model")

    @MODELS.register()
    class MambaLowlight(nn.Module): ...

    model = MODELS.build({"type": "MambaLowlight", "embed_dim": 64})

Unknown `type:` values and unknown keys raise ConfigError naming them, so a typo in a YAML file
never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from semi_llie.errors import ConfigError


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} type {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            hint = difflib.get_close_matches(name, self._entries, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"unknown {self.kind} type {name!r}{suggestion}; known types: {', '.join(self.names())}"
            )
        return self._entries[name]

    def build(self, cfg: Mapping[str, Any], **extra: Any) -> Any:
        """Build from a config block: `type` picks the class, the other keys are its arguments.

        `extra` are arguments supplied by code (not the YAML), e.g. a shared feature extractor.
        """
        if "type" not in cfg:
            raise ConfigError(f"{self.kind} config block {dict(cfg)!r} has no 'type' key")
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        factory = self.get(cfg["type"])
        check_kwargs(factory, kwargs, where=f"{self.kind} {cfg['type']!r}")
        return factory(**kwargs, **extra)


def check_kwargs(factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError naming each key that `factory` does not accept (with a close match)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in kwargs:
        if key not in accepted:
            hint = difflib.get_close_matches(key, accepted, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"unknown key {key!r} for {where}{suggestion}; accepted keys: {', '.join(accepted)}"
            )
