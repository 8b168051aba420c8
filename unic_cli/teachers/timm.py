"""TimmTeacher: a timm ViT, SAM or ConvNet as a Backbone; the prefix (class + register tokens) split off.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, P prefix tokens, D token width, h/w grid.

Tokens come from `forward_features` (the final norm applied): a ViT returns [B, P + N, D] with the prefix
[cls, registers...] first; a ConvNet (or SAM's neck) returns a feature map [B, D, h, w], Swin [B, h, w, D]
(hierarchical models are feature-map teachers, fed their native size). Models that pool or merge tokens
(LeViT, PiT, MViT, Mixer) or take only one input size (CaiT under another grid) are refused with one message
that suggests `py:MODULE:CALLABLE`. The summary token is the class token (`summary_from = "cls"`) or the model's
own pooled embedding (`"pool"`: `forward_head` with `pre_logits=True`, i.e. global average pool, SigLIP's
attention pool, ...). Models that normalise only after pooling (`norm` = Identity, `fc_norm` set, e.g. EVA-02
MIM) get `fc_norm` on every token, so patch tokens are normalised like the pooled one.
"""

from __future__ import annotations

import difflib
import logging
from typing import get_args

import torch
from torch import nn

from unic_cli.errors import RegistryError, UnknownTeacherError
from unic_cli.registry import Interpolation, TeacherCard, TeacherSpec, card_path
from unic_cli.teachers.weights import (
    convert_efficientnet_pytorch,
    hub_access,
    hub_error,
    is_efficientnet_pytorch,
    load_into,
    read_state_dict,
    resolve_weights_ref,
    strip_common_prefix,
)

log = logging.getLogger("unic_cli")


def _patch_size(patch_embed: nn.Module | None) -> int | None:
    """A patch embedding's patch size (timm stores a tuple, XCiT an int); None when it has none."""
    size = getattr(patch_embed, "patch_size", None)
    if isinstance(size, (tuple, list)) and size:
        size = size[0]
    return int(size) if isinstance(size, int) else None


def describe_model(model: nn.Module) -> dict:
    """What a built timm model provides, read from its modules (works on the meta device).

    Returns a dict with family, patch_size, token_dim, summary_dim, num_prefix_tokens, num_register_tokens,
    has_cls, has_pool, nhwc (the feature map is [B, h, w, D], as in Swin) and unsupported (why unic cannot use
    the model as a teacher, or None).

    A ViT has one patch grid: a patch embedding whose stride is the model's final stride (a hybrid CNN stem
    counts by its total stride) and tokens [prefix..., patch...]. Everything else must return a feature map
    and is treated as a ConvNet (Swin, NesT, PVT: hierarchical, fed their native size); models that pool or
    merge tokens into a sequence (LeViT, PiT, MViT, Mixer) are refused by `check_layout` and `forward_tokens`.
    """
    patch_embed = getattr(model, "patch_embed", None)
    feature_info = getattr(model, "feature_info", None) or []
    reduction = int(feature_info[-1]["reduction"]) if feature_info else None
    patch_size = _patch_size(patch_embed)
    hybrid = patch_embed is not None and getattr(patch_embed, "backbone", None) is not None
    nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
    plain_grid = reduction is None or reduction == patch_size or hybrid
    if patch_embed is not None and patch_size is not None and plain_grid and not nhwc:
        family = "vit"
        stride = reduction if hybrid and reduction else patch_size
    else:
        family = "convnet"
        stride = reduction if reduction is not None else patch_size
    has_cls = getattr(model, "cls_token", None) is not None
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    unsupported = None
    if stride is None:
        unsupported = "it states no feature stride (no feature_info)"
    elif family == "vit" and num_prefix < int(has_cls):
        unsupported = "its class token is not part of its token sequence (pooled or class-attention tokens)"
    pool = getattr(model, "global_pool", "")
    has_pool = getattr(model, "attn_pool", None) is not None or (
        bool(pool) and str(pool) not in ("token", "")
    ) or family == "convnet"
    return {
        "family": family,
        "patch_size": int(stride or 0),
        "token_dim": int(model.num_features),
        "summary_dim": int(getattr(model, "head_hidden_size", model.num_features)),
        "num_prefix_tokens": num_prefix if family == "vit" else 0,
        "num_register_tokens": max(num_prefix - int(has_cls), 0) if family == "vit" else 0,
        "has_cls": has_cls and family == "vit",
        "has_pool": has_pool,
        "nhwc": nhwc,
        "unsupported": unsupported,
    }


def unsupported_error(model_name: str, why: str) -> UnknownTeacherError:
    """The one message for a timm model that is neither a plain ViT nor a feature-map model."""
    return UnknownTeacherError(
        f"timm model {model_name!r} cannot be used as a teacher: {why}. unic takes timm ViTs with one patch grid "
        "(a class token and registers, then the patch tokens) and models whose features are a map (ConvNets, "
        "Swin); wrap this one with py:MODULE:CALLABLE, returning the tokens you want (docs/teachers.md, 'Your own "
        "module')"
    )


def check_layout(model: nn.Module, facts: dict, image_size: int, model_name: str) -> None:
    """Raise UnknownTeacherError when `forward_features` does not give the layout `facts` promises.

    Runs on the meta device (shapes only); a model the meta device cannot run is left to `forward_tokens`'
    own check.
    """
    if facts["unsupported"]:
        raise unsupported_error(model_name, facts["unsupported"])
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.empty(1, 3, image_size, image_size, device="meta"))
    except Exception as err:  # user-chosen architectures fail on meta in many ways; forward_tokens re-checks
        log.debug("shape probe of %s on the meta device failed: %s", model_name, err)
        return
    problem = _layout_problem(feats, facts, (image_size, image_size))
    if problem:
        raise unsupported_error(model_name, problem)


def _layout_problem(feats: object, facts: dict, input_size: tuple[int, int]) -> str | None:
    """Why `forward_features` output `feats` for `input_size` pixels breaks the contract, or None."""
    if not isinstance(feats, torch.Tensor):
        return f"its forward_features returns a {type(feats).__name__}, not one tensor (several branches or stages)"
    shape = tuple(feats.shape)
    D, P, p = facts["token_dim"], facts["num_prefix_tokens"], facts["patch_size"]
    if facts["family"] == "vit":
        h, w = input_size[0] // p, input_size[1] // p
        if len(shape) == 4:  # SAM's neck: a feature map on the patch grid
            hw, channels = (shape[1:3], shape[3]) if facts["nhwc"] else (shape[2:], shape[1])
            if channels == D and tuple(hw) == (h, w):
                return None
        if len(shape) != 3 or shape[1] != P + h * w or shape[2] != D:
            return (f"for a {input_size[0]}x{input_size[1]} px input its features are {list(shape)}, not "
                    f"{P} prefix + {h}x{w} patch tokens of width {D} (it pools or merges tokens)")
        return None
    if len(shape) == 4 and shape[-1 if facts["nhwc"] else 1] == D:
        return None
    if len(shape) == 3:
        return (f"its features are a token sequence {list(shape)} with no single patch grid "
                "(pooled or merged tokens, as in LeViT, PiT, MViT, Mixer)")
    return f"its features are {list(shape)}, neither {D}-d tokens on one patch grid nor a {D}-channel feature map"


def check_card(card: TeacherCard, facts: dict, model_name: str) -> None:
    """Raise RegistryError listing every way `card` disagrees with the built model (`describe_model` facts)."""
    problems = []
    if card.family != facts["family"]:
        problems.append(f"family is {card.family!r}, the model is a {facts['family']}")
    if card.patch_size != facts["patch_size"]:
        what = "patch_size" if facts["family"] == "vit" else "patch_size (feature stride)"
        problems.append(f"{what} is {card.patch_size}, the model has {facts['patch_size']}")
    if card.patch_dim != facts["token_dim"]:
        problems.append(f"patch_dim is {card.patch_dim}, the model's tokens are {facts['token_dim']}-d")
    if card.num_register_tokens != facts["num_register_tokens"]:
        problems.append(
            f"num_register_tokens is {card.num_register_tokens}, the model has {facts['num_register_tokens']}"
        )
    if card.has_summary:
        if card.summary_from == "cls" and not facts["has_cls"]:
            problems.append("summary_from is 'cls' but the model has no class token (use summary_from = \"pool\")")
        elif card.summary_from == "pool" and not facts["has_pool"]:
            problems.append("summary_from is 'pool' but the model has no pooling head (use summary_from = \"cls\")")
        width = facts["token_dim"] if card.summary_from == "cls" else facts["summary_dim"]
        if card.summary_dim != width:
            problems.append(f"summary_dim is {card.summary_dim}, the model's {card.summary_from} token is {width}-d")
    if problems:
        raise RegistryError(_card_problem(card, model_name, problems))


def _card_problem(card: TeacherCard, model_name: str, problems: list[str]) -> str:
    where = card_path(card.alias)
    fix = f"fix {where}" if where else "fix the spec's ?key=value overrides"
    return f"teacher {card.alias!r} does not match the model {model_name}: " + "; ".join(problems) + f" ({fix})"


class TimmTeacher(nn.Module):
    """A timm model as a Backbone.

    Args:
        card: the resolved card; checked against the model (widths, patch size, registers, summary source).
        model: a timm model built without a classifier (`num_classes=0`).
    """

    def __init__(self, card: TeacherCard, model: nn.Module) -> None:
        super().__init__()
        facts = describe_model(model)
        if facts["unsupported"]:
            raise unsupported_error(card.model_id, facts["unsupported"])
        check_card(card, facts, type(model).__name__ + f" ({card.model_id})")
        self.card = card
        self.model = model
        self.facts = facts
        self.num_prefix_tokens = facts["num_prefix_tokens"]
        norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
        post_pool_norm = isinstance(norm, nn.Identity) and fc_norm is not None and not isinstance(fc_norm, nn.Identity)
        self.token_norm = fc_norm if post_pool_norm else nn.Identity()

    def set_input_size(self, input_size: tuple[int, int]) -> None:
        """Resample the position embedding (and rope grid) once for a fixed input size, as timm does on load."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if self.card.family != "vit" or patch_embed is None or getattr(self.model, "dynamic_img_size", False):
            return  # feature-map models are fed their native size; dynamic ViTs take any size as they are
        native = tuple(getattr(patch_embed, "img_size", None) or ())
        if native == tuple(input_size):
            return
        if hasattr(self.model, "set_input_size"):
            self.model.set_input_size(img_size=tuple(input_size))
        elif getattr(patch_embed, "strict_img_size", False):  # CaiT, ConViT: a fixed position embedding
            g = native[0] // self.card.patch_size, native[1] // self.card.patch_size
            raise UnknownTeacherError(
                f"teacher {self.card.alias!r}: timm model {self.card.model_id!r} only takes {native[0]}x{native[1]} "
                f"px (a {g[0]}x{g[1]} grid) and cannot resample its position embedding, but the student's grid needs "
                f"{input_size[0]}x{input_size[1]} px; use a student with a {g[0]}x{g[1]} grid, or wrap the model "
                "with py:MODULE:CALLABLE as a feature-map teacher (docs/teachers.md, 'Your own module')"
            )

    def forward_tokens(self, images_BCHW: torch.Tensor):
        feats = self.model.forward_features(images_BCHW)
        input_size = (images_BCHW.shape[-2], images_BCHW.shape[-1])
        problem = _layout_problem(feats, self.facts, input_size)
        if problem:  # shapes only, no host sync; a model that pads or pools tokens would misalign the grid
            raise unsupported_error(self.card.model_id, problem)
        want_summary = self.card.has_summary
        if feats.ndim == 4:  # a feature map: ConvNets, SAM's neck, Swin (NHWC)
            fmap_BDhw = feats.permute(0, 3, 1, 2) if self.facts["nhwc"] else feats
            summary_BD = self.model.forward_head(feats, pre_logits=True) if want_summary else None
            return summary_BD, fmap_BDhw.flatten(2).transpose(1, 2), (fmap_BDhw.shape[-2], fmap_BDhw.shape[-1])
        h, w = input_size[0] // self.card.patch_size, input_size[1] // self.card.patch_size
        P = self.num_prefix_tokens
        summary_BD = None
        if want_summary:
            if self.card.summary_from == "cls":
                summary_BD = self.token_norm(feats[:, 0])
            else:
                summary_BD = self.model.forward_head(feats, pre_logits=True)
        return summary_BD, self.token_norm(feats[:, P:]), (h, w)


def _timm_name(card: TeacherCard) -> str:
    return f"{card.model_id}.{card.pretrained_tag}" if card.pretrained_tag else card.model_id


def create_model(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    """The timm model for a card, with weights from the hub, the card's `weights`, or the spec's local file.

    Local weights load with the classifier kept (timm's key layout is then complete and strict), converted from
    known foreign layouts (timm's own `checkpoint_filter_fn`, efficientnet_pytorch); the classifier is dropped
    afterwards.
    """
    import timm

    name = _timm_name(card)
    local = spec.weights if spec.weights is not None else card.weights
    if not pretrained or local is None:
        try:
            with hub_access(f"the weights of {name}"):
                return timm.create_model(name, pretrained=pretrained, num_classes=0)
        except OSError as err:  # huggingface_hub and urllib raise OSError subclasses when offline
            raise hub_error(card.alias, _hub_id(name), err) from None
    path = resolve_weights_ref(local)
    model = timm.create_model(name, pretrained=False)
    state = read_state_dict(path)
    if is_efficientnet_pytorch(state):
        state = convert_efficientnet_pytorch(state, model)
    else:
        state = strip_common_prefix(state, model.state_dict())
        if set(state) != set(model.state_dict()):
            state = _timm_filter(model, state)
    classifier = model.pretrained_cfg.get("classifier") or ""
    classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    load_into(model, state, origin=str(path), optional=lambda k: any(k.startswith(c + ".") for c in classifiers if c))
    model.reset_classifier(0)
    log.info("teacher %s: loaded %s", card.alias, path)
    return model


def _hub_id(name: str) -> str:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown tag has no cfg; the name itself is the best id to show
        return name
    return f"hf-hub:{cfg.hf_hub_id}" if cfg is not None and cfg.hf_hub_id else name


def _timm_filter(model: nn.Module, state: dict) -> dict:
    """Run timm's own converter for this model family (original DINOv2, DeiT, OpenAI CLIP... layouts)."""
    import sys

    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except Exception as err:  # timm's converters assume their own layout; a foreign file fails in many ways
        log.debug("timm checkpoint_filter_fn failed: %s", err)
        return state


def build_backbone(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    """The Backbone for a timm card or `timm:` spec."""
    return TimmTeacher(card, create_model(card, spec, pretrained=pretrained))


def card_from_model(model: nn.Module, *, alias: str, model_id: str, pretrained_tag: str | None,
                    source: str = "timm", pretrained_cfg: dict | None = None) -> TeacherCard:
    """A card read from a built timm model and its pretrained config (sizes, mean/std, licence)."""
    facts = describe_model(model)
    if facts["unsupported"]:
        raise unsupported_error(model_id, facts["unsupported"])
    cfg = dict(pretrained_cfg if pretrained_cfg is not None else model.pretrained_cfg)
    image_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    if facts["family"] == "vit" and image_size % facts["patch_size"]:
        image_size = image_size // facts["patch_size"] * facts["patch_size"]
    if facts["has_cls"]:
        tokens, summary_from, summary_dim = ("summary", "patch"), "cls", facts["token_dim"]
    elif facts["has_pool"]:
        tokens, summary_from, summary_dim = ("summary", "patch"), "pool", facts["summary_dim"]
    else:
        tokens, summary_from, summary_dim = ("patch",), "cls", None
    interpolation = cfg.get("interpolation", "bicubic")
    paper = cfg.get("paper_ids") or ""
    return TeacherCard.from_dict(
        {
            "alias": alias,
            "source": source,
            "model_id": model_id,
            "pretrained_tag": pretrained_tag,
            "family": facts["family"],
            "image_size": image_size,
            "patch_size": facts["patch_size"],
            "summary_dim": summary_dim,
            "patch_dim": facts["token_dim"],
            "num_register_tokens": facts["num_register_tokens"],
            "tokens": list(tokens),
            "summary_from": summary_from,
            "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
            "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))],
            "interpolation": interpolation if interpolation in get_args(Interpolation) else "bicubic",
            "license": str(cfg.get("license") or "unknown"),
            "paper": paper if isinstance(paper, str) else ", ".join(paper),
        },
        origin=f"teacher spec {alias!r}",
    )


def card_from_spec(spec: TeacherSpec) -> TeacherCard:
    """A card for `timm:NAME[.TAG]`, built on the meta device (no weights, no download)."""
    import timm

    model_id, _, tag = spec.target.partition(".")
    if not timm.is_model(model_id):
        close = difflib.get_close_matches(model_id, timm.list_models(), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownTeacherError(f"timm has no model {model_id!r} (teacher spec {spec.text!r}).{hint}")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{model_id}.*")]
        if tag not in tags:
            raise UnknownTeacherError(
                f"timm model {model_id!r} has no pretrained tag {tag!r} (teacher spec {spec.text!r}); "
                f"tags: {', '.join(tags) or 'none'}"
            )
    with torch.device("meta"):
        model = timm.create_model(spec.target, pretrained=False, num_classes=0)
    if spec.weights is None and not model.pretrained_cfg.get("hf_hub_id") and not model.pretrained_cfg.get("url"):
        log.warning("timm model %s has no pretrained weights; it will be a random teacher", spec.target)
    card = card_from_model(model, alias=spec.name, model_id=model_id, pretrained_tag=tag or None)
    check_layout(model, describe_model(model), card.image_size, model_id)
    return card
