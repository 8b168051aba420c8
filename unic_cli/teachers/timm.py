"""TimmTeacher: a timm ViT, SAM or ConvNet as a Backbone; the prefix (class + register tokens) split off.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, P prefix tokens, D token width, h/w grid.

Tokens come from `forward_features` (the final norm applied): a ViT returns [B, P + N, D] with the prefix
[cls, registers...] first; a ConvNet (or SAM's neck) returns a feature map [B, D, h, w]. The summary token is
the class token (`summary_from = "cls"`) or the model's own pooled embedding (`"pool"`: `forward_head` with
`pre_logits=True`, i.e. global average pool, SigLIP's attention pool, ...). Models that normalise only after
pooling (`norm` = Identity, `fc_norm` set, e.g. EVA-02 MIM) get `fc_norm` on every token, so patch tokens are
normalised like the pooled one.
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
    hub_error,
    is_efficientnet_pytorch,
    load_into,
    read_state_dict,
    resolve_weights_ref,
    strip_common_prefix,
)

log = logging.getLogger("unic_cli")


def describe_model(model: nn.Module) -> dict:
    """What a built timm model provides, read from its modules (works on the meta device).

    Returns a dict with family, patch_size, token_dim, summary_dim, num_prefix_tokens, num_register_tokens,
    has_cls and has_pool.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        family = "vit"
        patch_size = int(patch_embed.patch_size[0])
    else:
        family = "convnet"
        patch_size = int(model.feature_info[-1]["reduction"])
    has_cls = getattr(model, "cls_token", None) is not None
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    pool = getattr(model, "global_pool", "")
    has_pool = getattr(model, "attn_pool", None) is not None or (
        bool(pool) and str(pool) not in ("token", "")
    ) or family == "convnet"
    return {
        "family": family,
        "patch_size": patch_size,
        "token_dim": int(model.num_features),
        "summary_dim": int(getattr(model, "head_hidden_size", model.num_features)),
        "num_prefix_tokens": num_prefix,
        "num_register_tokens": num_prefix - int(has_cls),
        "has_cls": has_cls,
        "has_pool": has_pool,
    }


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
        check_card(card, facts, type(model).__name__ + f" ({card.model_id})")
        self.card = card
        self.model = model
        self.num_prefix_tokens = facts["num_prefix_tokens"]
        norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
        post_pool_norm = isinstance(norm, nn.Identity) and fc_norm is not None and not isinstance(fc_norm, nn.Identity)
        self.token_norm = fc_norm if post_pool_norm else nn.Identity()

    def set_input_size(self, input_size: tuple[int, int]) -> None:
        """Resample the position embedding (and rope grid) once for a fixed input size, as timm does on load."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None or not hasattr(self.model, "set_input_size") or getattr(self.model, "dynamic_img_size",
                                                                                     False):
            return  # ConvNets and SAM take any size as they are
        if tuple(patch_embed.img_size or ()) != tuple(input_size):
            self.model.set_input_size(img_size=tuple(input_size))

    def forward_tokens(self, images_BCHW: torch.Tensor):
        feats = self.model.forward_features(images_BCHW)
        want_summary = self.card.has_summary
        if feats.ndim == 4:  # a feature map: ConvNets, SAM's neck
            grid = (feats.shape[-2], feats.shape[-1])
            summary_BD = self.model.forward_head(feats, pre_logits=True) if want_summary else None
            return summary_BD, feats.flatten(2).transpose(1, 2), grid
        h, w = images_BCHW.shape[-2] // self.card.patch_size, images_BCHW.shape[-1] // self.card.patch_size
        P = self.num_prefix_tokens
        if feats.shape[1] != P + h * w:  # a model that pads or pools tokens would silently misalign the grid
            raise RuntimeError(f"{self.card.alias}: expected {P} + {h}x{w} tokens, got {feats.shape[1]}")
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
    return card_from_model(model, alias=spec.name, model_id=model_id, pretrained_tag=tag or None)
