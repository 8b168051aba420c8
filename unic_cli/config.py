"""Frozen per-command configs (Distill/Export/Probe), layered from defaults, a TOML file and flags.

Each command gets one flat `frozen=True, kw_only=True` dataclass built by `from_sources(file, flags)`:
defaults < TOML file < flags that were given (None means "not given"). Unknown keys are rejected with a
close-name suggestion, and `validate()` collects every problem into one `ConfigError`, all before any
weights load. `to_toml()` writes a file that `--config` reads back into the same config.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from unic_cli.errors import ConfigError

C = TypeVar("C", bound="CommandConfig")


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a TOML/flag value to the annotated field type (Path, tuple, float from int)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value) if len(inner) == 1 else value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name} must be a path, got {value!r}")
        return Path(value).expanduser()
    if origin is tuple:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(name, item, v) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if annotation is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{name} must be {annotation.__name__}, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    """Plain TOML/JSON types: Path -> str, tuple -> list; None is dropped by the caller."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


@dataclass(frozen=True, kw_only=True)
class CommandConfig:
    """Base of the per-command configs: layering, coercion, validation and TOML round trip."""

    command: ClassVar[str] = ""

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Field name -> default (MISSING for required fields): the one source of defaults for `--help`."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def from_sources(cls: type[C], config_file: Path | None = None, flags: dict[str, Any] | None = None) -> C:
        """Layer defaults < TOML file < given flags, reject unknown keys, coerce types, then validate()."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        problems: list[str] = []
        if config_file is not None:
            try:
                raw = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise ConfigError(f"cannot read config file {str(config_file)!r}: {err}") from None
            raw.pop("unic_version", None)
            if raw.pop("command", cls.command) != cls.command:
                problems.append(f"{config_file} is not a `unic {cls.command}` config")
            for key in raw:
                if key not in names:
                    close = difflib.get_close_matches(key, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    problems.append(f"{config_file}: unknown key {key!r}{hint}")
            values.update({k: v for k, v in raw.items() if k in names})
        for key, value in (flags or {}).items():
            if key not in names:
                raise TypeError(f"{cls.__name__} has no field {key!r}")  # a programming error, not a user one
            if value is not None and value != ():
                values[key] = value
        for f in fields(cls):
            if f.name not in values:
                if f.default is MISSING and f.default_factory is MISSING:
                    problems.append(f"missing required setting --{f.name.replace('_', '-')}")
                continue
            try:
                values[f.name] = _coerce(f.name, hints[f.name], values[f.name])
            except ConfigError as err:
                problems.extend(err.problems)
        if problems:
            raise ConfigError(problems)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise one ConfigError listing every problem; subclasses collect into `self.problems()`."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        """Plain types (str paths, lists), None dropped: safe for JSON, TOML and `torch.load(weights_only=True)`."""
        return {k: _plain(v) for k, v in asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        from unic_cli import __version__

        return tomli_w.dumps({"command": self.command, "unic_version": __version__, **self.to_dict()})

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any]) -> C:
        """Rebuild from `to_dict()` output (e.g. the config stored in a checkpoint), without re-validating."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        return cls(**{k: _coerce(k, hints[k], v) for k, v in raw.items() if k in names})
