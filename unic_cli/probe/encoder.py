"""Models to probe: a MODEL argument -> `ModelRef` (no weights) -> `Encoder` (loaded, frozen).

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D token width, h/w patch grid, P prefix tokens.

Three kinds of MODEL share one interface (`Encoder`): an exported student folder (it has `unic.json`), a
registry alias or explicit teacher spec (`unic_cli.teachers.load_teacher`, local weights with `SPEC=PATH`), and
a bare timm model name (treated as `timm:NAME`). Each is wrapped in a `Teacher`, so every model takes uint8
images on the device and resizes/normalises them itself: images -> (summary_BD, patch_BND, grid).

`resolve_model` reads only metadata (folders, cards, file sizes and mtimes), so every MODEL is checked and its
cache key (`ModelRef.identity`) known before any weights load; `load_encoder` loads them, once, and only when
some split misses the feature cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unic_cli.errors import ProbeError, UnknownTeacherError
from unic_cli.registry import TeacherCard, TeacherSpec, parse_teacher_spec
from unic_cli.teachers import Teacher, load_teacher, resolve_card

class _TimmTokens(nn.Module):
    """A timm model (an exported student) as a teachers.base.Backbone: final-norm tokens, prefix split off."""

    def __init__(self, model: nn.Module, *, is_vit: bool) -> None:
        super().__init__()
        self.model, self.is_vit = model, is_vit

    def forward_tokens(self, images_BCHW: torch.Tensor):
        if not self.is_vit:
            fmap_BDhw = self.model.forward_features(images_BCHW)
            summary_BD = self.model.forward_head(fmap_BDhw, pre_logits=True)
            return summary_BD, fmap_BDhw.flatten(2).transpose(1, 2), tuple(fmap_BDhw.shape[-2:])
        (patch_BDhw, prefix_BPD), = self.model.forward_intermediates(
            images_BCHW, indices=1, norm=True, return_prefix_tokens=True, output_fmt="NCHW", intermediates_only=True
        )
        # the class token (timm puts it first, before any registers); none: the mean patch token downstream, as
        # the student was distilled (a register token is no summary)
        has_cls = getattr(self.model, "cls_token", None) is not None
        summary_BD = prefix_BPD[:, 0] if has_cls and prefix_BPD.shape[1] else None
        return summary_BD, patch_BDhw.flatten(2).transpose(1, 2), tuple(patch_BDhw.shape[-2:])


@dataclass(frozen=True)
class ModelRef:
    """A MODEL argument resolved without loading weights: enough to key the cache and to load it later.

    Attributes:
        name: the key in probe.json: the MODEL argument as typed, a student folder normalised
            (`normalise_model_name`).
        kind: `student` (an exported folder) or `teacher` (a registry alias, explicit spec or timm name).
        image_size: the side of the square input this model is fed.
        identity: what its features depend on (model, weights files, resolution); hashed into cache keys.
        spec: the teacher spec (teachers), with any resolution override applied.
        folder: the exported folder (students).
    """

    name: str
    kind: Literal["student", "teacher"]
    image_size: int
    identity: dict
    spec: TeacherSpec | None = None
    folder: Path | None = None


@dataclass(eq=False)
class Encoder:
    """A loaded model behind the common interface: images -> (summary_BD, patch_BND, grid).

    `module` is a frozen `Teacher`: it takes uint8 or [0, 1] images on its device, resizes them to its input
    size and normalises them with its own mean/std.
    """

    ref: ModelRef
    module: Teacher

    @property
    def name(self) -> str:
        return self.ref.name

    @torch.no_grad()
    def __call__(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """A model without a summary token gets its mean patch token as summary."""
        summary_BD, patch_BND = self.module(images_BCHW)
        if summary_BD is None:
            summary_BD = patch_BND.mean(dim=1)
        return summary_BD.float(), patch_BND.float(), self.module.grid

    @torch.no_grad()
    def dense_tokens(self, images_BCHW: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens of the last `num_levels` feature levels, concatenated channel-wise (see multi_level_tokens)."""
        if num_levels == 1:
            _, patch_BND = self.module(images_BCHW)
            return patch_BND.float(), self.module.grid
        return multi_level_tokens(self.module, images_BCHW, num_levels)


DENSE_STRIDE = 16  # ConvNet levels are laid on a 16-pixel grid, the patch grid of a ViT/16 at the same input


def timm_model_of(module: Teacher) -> nn.Module | None:
    """The timm model inside a Teacher (timm teachers and exported students), or None for other sources."""
    model = getattr(module.backbone, "model", None)
    return model if model is not None and hasattr(model, "forward_intermediates") else None


def multi_level_tokens(module: Teacher, images_BCHW: torch.Tensor, num_levels: int):
    """The last `num_levels` feature levels of a timm model as one token map: (patch_BND float32, grid).

    A ViT gives its last blocks' patch tokens, each through the final norm (DINOv2's multi-layer linear probe).
    A ConvNet gives its last stages (timm `feature_info`), average-pooled or bilinearly upsampled onto a grid of
    stride 16 (or its coarsest stage's stride, if finer): a hypercolumn, where a ConvNet's last map alone is at
    stride 32 and too coarse for small objects.
    """
    model = timm_model_of(module)
    if model is None:
        raise ProbeError(f"--dense-layers {num_levels} needs a timm model; {module.card.alias!r} is a "
                         f"{module.card.source} model: probe it with --dense-layers 1")
    available = len(model.blocks) if module.card.family == "vit" else len(getattr(model, "feature_info", []))
    if num_levels > available:
        raise ProbeError(f"--dense-layers {num_levels}: {module.card.alias!r} has {available} feature levels; "
                         f"use at most {available}")
    x, autocast = module.precision(module.preprocess(images_BCHW))
    with autocast:
        if module.card.family == "vit":
            maps = model.forward_intermediates(x, indices=num_levels, norm=True, output_fmt="NCHW",
                                               intermediates_only=True)
            grid = tuple(maps[-1].shape[-2:])
        else:
            maps = model.forward_intermediates(x, indices=num_levels, intermediates_only=True)
            stride = min(DENSE_STRIDE, x.shape[-1] // maps[-1].shape[-1])
            grid = (-(-x.shape[-2] // stride), -(-x.shape[-1] // stride))
    resized = []
    for fmap_BDhw in maps:
        fmap_BDhw = fmap_BDhw.float()
        if tuple(fmap_BDhw.shape[-2:]) != grid:
            finer = fmap_BDhw.shape[-1] > grid[1]
            fmap_BDhw = (F.adaptive_avg_pool2d(fmap_BDhw, grid) if finer
                         else F.interpolate(fmap_BDhw, size=grid, mode="bilinear", align_corners=False))
        resized.append(fmap_BDhw)
    return torch.cat(resized, dim=1).flatten(2).transpose(1, 2), grid


def is_student_dir(model: str) -> bool:
    return (Path(model).expanduser() / "unic.json").is_file()


def normalise_model_name(model: str) -> str:
    """The probe.json key of a MODEL: a student folder without `./` or a trailing `/` (shell completion adds
    one), so `students/a/` and `students/a` are one model; any other MODEL as typed."""
    return os.path.normpath(model) if is_student_dir(model) else model


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _vit_size(size: int, patch: int) -> int:
    """The nearest multiple of the patch size (a ViT needs whole patches)."""
    return max(patch, round(size / patch) * patch)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ProbeError(f"{str(path)!r} is unreadable ({err}); re-run `unic export` for this student") from None


def _check_weights(path: Path) -> None:
    """An exported student's model.safetensors must exist and have a readable header (the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ProbeError(f"{str(path)!r} is missing, so this student folder is incomplete; re-run `unic export` "
                         "for this student")
    try:
        with safe_open(path, framework="pt"):
            pass
    except (OSError, SafetensorError) as err:
        raise ProbeError(f"{str(path)!r} is not a readable safetensors file ({err}); re-run `unic export` for "
                         "this student") from None


def _resolve_spec(model: str) -> TeacherSpec:
    """A teacher spec; a bare timm model name that is not a registry alias becomes `timm:NAME`."""
    spec = parse_teacher_spec(model)
    if spec.source != "alias":
        return spec
    try:
        resolve_card(spec)
        return spec
    except UnknownTeacherError as err:
        if Path(model).expanduser().is_dir():
            raise ProbeError(f"{model!r} is a folder without unic.json; pass a folder written by `unic export`, "
                             "a registry alias, a teacher spec or a timm model name") from None
        import timm

        if timm.is_model(spec.target.split(".")[0]):
            return parse_teacher_spec("timm:" + model)
        name = spec.name
        if spec.weights is None and ("/" in name or os.sep in name or name.startswith((".", "~"))):  # no alias does
            what = "is a file, not a folder" if Path(model).expanduser().exists() else "does not exist"
            raise ProbeError(f"MODEL {model!r} looks like a student folder, but it {what}; pass a folder written "
                             "by `unic export` (check the path), a registry alias, a teacher spec or a timm model "
                             "name") from None
        raise err


def resolve_model(model: str, *, image_size: int | None = None, pretrained: bool = True, seed: int = 0) -> ModelRef:
    """Resolve a MODEL argument (student folder, alias, teacher spec, timm name) without loading weights.

    Args:
        model: the MODEL argument.
        image_size: None feeds the model at its own resolution (classification); an int feeds it at that
            resolution (dense tasks), rounded to a multiple of a ViT's patch size.
        pretrained: False means random weights (a baseline; cached separately, seeded by `seed`).
    """
    extra = {"pretrained": pretrained, **({} if pretrained else {"seed": seed})}
    if is_student_dir(model):
        folder = Path(model).expanduser()
        config, meta = _read_json(folder / "config.json"), _read_json(folder / "unic.json")
        _check_weights(folder / "model.safetensors")
        native = int(config.get("pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
        patch = int(meta.get("student", {}).get("patch_size") or 16)
        size = native if image_size is None else _vit_size(image_size, patch)
        files = [folder / n for n in ("config.json", "unic.json", "model.safetensors")]
        # "summary": how the summary token is read (v2: a register token is no summary; cached v1 features are stale)
        identity = {"kind": "student", "files": [_file_stamp(p) for p in files], "image_size": size,
                    "summary": 2, **extra}
        return ModelRef(normalise_model_name(model), "student", size, identity, folder=folder)
    spec = _resolve_spec(model)
    card = resolve_card(spec)
    if image_size is not None and image_size != card.image_size:
        size = _vit_size(image_size, card.patch_size) if card.family == "vit" else image_size
        spec = dataclasses.replace(spec, overrides={**spec.overrides, "image_size": str(size)})
        card = resolve_card(spec)
    identity = {"kind": "teacher", "spec": spec.text, "card": card.to_dict(), **extra}
    local = [spec.weights, Path(card.weights).expanduser() if card.weights and ":" not in card.weights else None]
    stamps = [_file_stamp(p) for p in local if p is not None and p.is_file()]
    if stamps:
        identity["weights"] = stamps
    return ModelRef(model, "teacher", card.image_size, identity, spec=spec)


def _build_student(ref: ModelRef, *, pretrained: bool) -> Teacher:
    """An exported student folder (model.safetensors + timm config.json + unic.json) as a frozen Teacher."""
    import timm

    folder = ref.folder
    config, meta = _read_json(folder / "config.json"), _read_json(folder / "unic.json")
    cfg = config.get("pretrained_cfg", {})
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    # timm resamples the position embedding while loading the weights at another size
    kwargs = {"img_size": ref.image_size} if ref.image_size != native else {}
    model = timm.create_model(f"local-dir:{folder}", pretrained=pretrained, num_classes=0, **kwargs)
    is_vit = hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")
    # a ConvNet's "patch size" is the stride of its last feature map
    patch = int(model.patch_embed.patch_size[0]) if is_vit else int(model.feature_info[-1]["reduction"])
    interpolation = cfg.get("interpolation", "bicubic")
    card = TeacherCard(
        alias=ref.name, source="timm", model_id=config.get("architecture", "unknown"),
        family="vit" if is_vit else "convnet", image_size=ref.image_size, patch_size=patch,
        summary_dim=int(model.num_features), patch_dim=int(model.num_features),
        num_register_tokens=int(getattr(model, "num_reg_tokens", 0) or 0),
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        license=",".join(meta.get("license", {}).get("licenses", [])) or "unknown",
    )
    return Teacher(card, _TimmTokens(model, is_vit=is_vit))


def load_encoder(ref: ModelRef, *, device: str = "cpu") -> Encoder:
    """Load a resolved model's weights (or seeded random weights) onto `device`."""
    pretrained = ref.identity["pretrained"]
    torch.manual_seed(ref.identity.get("seed", 0))
    if ref.kind == "student":
        module = _build_student(ref, pretrained=pretrained)
    else:
        module = load_teacher(ref.spec, grid=None, pretrained=pretrained)
    return Encoder(ref, module.to(device))
