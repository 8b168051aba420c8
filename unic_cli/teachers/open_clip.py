"""OpenClipTeacher: trunk tokens of an OpenCLIP visual tower, before the projection; text side kept for zero-shot.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, L sequence (1 + N), D trunk width, E joint
embedding width, h/w grid.

For OpenCLIP's own ViT (CLIP, MetaCLIP) the tokens are `ln_post` applied to every output token of the
transformer; the summary is the class token (`pool_type = "tok"`), so `summary_to_embedding` (summary @ proj,
L2-normalised) reproduces `encode_image` exactly. The positional embedding is resampled (bicubic) when the input
grid differs from the native one. Timm-trunk towers (SigLIP, SigLIP2) go through the timm adapter: tokens after
the trunk's final norm, summary = the attention-pool output, which is SigLIP's image embedding.

The text tower is kept outside the module tree: `.to(device)` and `parameters()` see only the visual tower that
is distilled; `encode_text` moves the text side to the visual tower's device on first use.
"""

from __future__ import annotations

import difflib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from unic_cli.errors import RegistryError, UnknownTeacherError, WeightsError
from unic_cli.registry import TeacherCard, TeacherSpec
from unic_cli.teachers.timm import TimmTeacher, card_from_model
from unic_cli.teachers.weights import hub_access, hub_error, load_into, read_state_dict, resolve_weights_ref

log = logging.getLogger("unic_cli")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Licences of OpenCLIP's pretrained tags (open_clip's docs/PRETRAINED.md; the configs themselves carry none).
_TAG_LICENSES = (("openai", "mit"), ("metaclip", "cc-by-nc-4.0"), ("webli", "apache-2.0"), ("laion", "mit"),
                 ("datacomp", "mit"), ("dfn", "apple-amlr"), ("merged2b", "mit"))


def _tag_license(tag: str | None) -> str:
    return next((lic for prefix, lic in _TAG_LICENSES if tag and tag.startswith(prefix)), "unknown")


def _split(target: str) -> tuple[str, str | None]:
    arch, _, tag = target.partition("/")
    return arch, tag or None


class OpenClipTeacher(nn.Module):
    """An OpenCLIP model's visual tower as a Backbone, with `encode_text` and `summary_to_embedding`.

    Args:
        card: the resolved card; checked against the visual tower.
        clip: the whole OpenCLIP model (visual and text towers).
        text_loaded: False when the weights held the visual tower only (encode_text then refuses).
    """

    def __init__(self, card: TeacherCard, clip: nn.Module, *, text_loaded: bool = True) -> None:
        super().__init__()
        from open_clip.timm_model import TimmModel

        self.card = card
        self.visual = clip.visual
        self._clip = (clip,)  # a tuple hides the text tower from .to(), .parameters() and state_dict()
        self.text_loaded = text_loaded
        self._tokenizer = None
        if isinstance(self.visual, TimmModel):
            self.timm = TimmTeacher(card, self.visual.trunk)
            return
        self.timm = None
        v = self.visual
        if not hasattr(v, "conv1") or getattr(v, "attn_pool", None) is not None:
            raise RegistryError(
                f"teacher {card.alias!r}: the OpenCLIP tower of {card.model_id} is not a plain ViT "
                f"({type(v).__name__}); only ViT towers (class-token or average pooled) are supported"
            )
        width, patch = v.conv1.out_channels, v.patch_size[0]
        pool = "cls" if v.pool_type == "tok" else "pool"
        problems = []
        if card.family != "vit":
            problems.append(f"family is {card.family!r}, the tower is a vit")
        if card.patch_size != patch:
            problems.append(f"patch_size is {card.patch_size}, the tower has {patch}")
        if card.patch_dim != width:
            problems.append(f"patch_dim is {card.patch_dim}, the trunk is {width}-d (not the joint embedding)")
        if card.num_register_tokens != 0:
            problems.append(f"num_register_tokens is {card.num_register_tokens}, OpenCLIP ViTs have none")
        if card.has_summary and card.summary_from != pool:
            problems.append(f"summary_from is {card.summary_from!r}, the tower pools with {v.pool_type!r}")
        if card.has_summary and card.summary_dim != width:
            problems.append(f"summary_dim is {card.summary_dim}, the trunk is {width}-d")
        if problems:
            raise RegistryError(
                f"teacher {card.alias!r} does not match open_clip {card.model_id}: " + "; ".join(problems)
            )

    def set_input_size(self, input_size: tuple[int, int]) -> None:
        if self.timm is not None:
            self.timm.set_input_size(input_size)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        v = self.visual
        pos_LD = v.positional_embedding
        if tuple(grid) == tuple(v.grid_size):
            return pos_LD
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos_LD[None], new_size=list(grid), old_size=list(v.grid_size),
                                      num_prefix_tokens=1)[0]

    def forward_tokens(self, images_BCHW: torch.Tensor):
        if self.timm is not None:
            return self.timm.forward_tokens(images_BCHW)
        v = self.visual
        x = v.conv1(images_BCHW)  # [B, D, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls_B1D = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls_B1D, x], dim=1) + self._pos_embed(grid).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x_BLD = v.transformer(x)
        tokens_BLD = v.ln_post(x_BLD)
        summary_BD = None
        if self.card.has_summary:
            if self.card.summary_from == "cls":
                summary_BD = tokens_BLD[:, 0]
            elif v.final_ln_after_pool:  # the model's own order: pool, then norm
                summary_BD = v.ln_post(x_BLD[:, 1:].mean(dim=1))
            else:
                summary_BD = tokens_BLD[:, 1:].mean(dim=1)
        return summary_BD, tokens_BLD[:, 1:], grid

    @torch.no_grad()
    def summary_to_embedding(self, summary_BD: torch.Tensor) -> torch.Tensor:
        """The joint-space image embedding (L2-normalised) from a summary token, via the model's own projection."""
        if self.timm is not None:
            trunk = self.visual.trunk
            head = trunk.get_classifier() if hasattr(trunk, "get_classifier") else nn.Identity()
            embed_BE = self.visual.head(head(summary_BD.to(_dtype_of(self.visual))))
        else:
            proj = self.visual.proj
            embed_BE = summary_BD.to(proj.dtype) @ proj if proj is not None else summary_BD.float()
        return F.normalize(embed_BE.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised joint-space text embeddings [len(texts), E], on the visual tower's device."""
        import open_clip

        if not self.text_loaded:
            raise WeightsError(
                f"teacher {self.card.alias!r}: the weights file held the visual tower only, so there is no text "
                "tower for zero-shot classification; pass the full OpenCLIP checkpoint"
            )
        clip = self._clip[0]
        device = next(self.visual.parameters()).device
        if next(clip.parameters()).device != device:
            clip.to(device)
        if self._tokenizer is None:
            try:
                with hub_access(f"the tokenizer of open_clip {self.card.model_id}"):
                    self._tokenizer = open_clip.get_tokenizer(self.card.model_id)
            except OSError as err:  # HF tokenizers (SigLIP) are downloaded on first use
                raise hub_error(self.card.alias, f"open_clip {self.card.model_id}", err, what="tokenizer",
                                fix="Without hub access, run zero-shot on a machine that has the tokenizer in "
                                    "its hub cache.") from None
        tokens = self._tokenizer(list(texts)).to(device)
        return clip.encode_text(tokens, normalize=True).float()


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _QuietRandomInit(logging.Filter):
    """open_clip warns on the root logger that a model without a tag is random; unic loads weights itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_architecture(arch: str) -> nn.Module:
    import open_clip

    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:  # torch.get_default_device() is "meta" inside `with torch.device("meta")`: open_clip moves the model there
        return open_clip.create_model(arch, pretrained=None, device=torch.get_default_device())
    finally:
        logging.getLogger().removeFilter(quiet)


def _download(card: TeacherCard) -> str:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(card.model_id, card.pretrained_tag or "")
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(card.model_id)) or "none"
        raise UnknownTeacherError(
            f"teacher {card.alias!r}: open_clip has no pretrained tag {card.pretrained_tag!r} for {card.model_id}; "
            f"tags: {tags}"
        )
    hub_id = f"open_clip {card.model_id}/{card.pretrained_tag} ({cfg.get('hf_hub') or cfg.get('url')})"
    try:
        with hub_access(f"the weights of open_clip {card.model_id}/{card.pretrained_tag}"):
            path = open_clip.download_pretrained(cfg)
    except Exception as err:  # hub, url and cache errors differ per backend; all mean "not downloadable"
        raise hub_error(card.alias, hub_id, err) from None
    if not path:
        raise hub_error(card.alias, hub_id, RuntimeError("open_clip found no download location"))
    return path


def create_model(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> tuple[nn.Module, bool]:
    """The OpenCLIP model for a card and whether its text tower holds weights."""
    import open_clip

    local = spec.weights if spec.weights is not None else card.weights
    hub_path = _download(card) if pretrained and local is None else None  # fail fast, before building
    model = _create_architecture(card.model_id)
    if not pretrained:
        return model, True
    if hub_path is not None:
        try:
            open_clip.load_checkpoint(model, hub_path, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"teacher {card.alias!r}: {hub_path} does not fit {card.model_id}: {err}") from None
        return model, True
    path = resolve_weights_ref(local)
    state = read_state_dict(path)
    from open_clip.convert import convert_state_dict
    from open_clip.factory import resize_pos_embed

    tower = set(model.visual.state_dict())
    if all(k.startswith("visual.") for k in state) and {k.removeprefix("visual.") for k in state} & tower:
        # the tower alone, cut out of a whole model's state dict with its `visual.` prefix kept
        state = {k.removeprefix("visual."): v for k, v in state.items()}
        visual_only = True
    else:
        visual_only = not any(k.startswith("visual.") for k in state) and bool(set(state) & tower)
    if not visual_only:  # a whole OpenCLIP checkpoint: open_clip's own conversions, then a strict load
        state = convert_state_dict(model, state)
        resize_pos_embed(state, model)
        load_into(model, state, origin=str(path), optional=lambda k: k in ("logit_bias",) and k not in state)
        text_loaded = True
    else:  # a visual-tower-only file
        load_into(model.visual, state, origin=str(path))
        text_loaded = False
        log.warning("teacher %s: %s holds the visual tower only; zero-shot (encode_text) is unavailable",
                    card.alias, path)
    log.info("teacher %s: loaded %s", card.alias, path)
    return model, text_loaded


def build_backbone(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    """The Backbone for an open_clip card or `open_clip:` spec."""
    model, text_loaded = create_model(card, spec, pretrained=pretrained)
    return OpenClipTeacher(card, model, text_loaded=text_loaded)


def card_from_spec(spec: TeacherSpec) -> TeacherCard:
    """A card for `open_clip:ARCH[/TAG]`, from open_clip's model config and pretrained config (no weights)."""
    import open_clip
    from open_clip.timm_model import TimmModel

    arch, tag = _split(spec.target)
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownTeacherError(f"open_clip has no model {arch!r} (teacher spec {spec.text!r}).{hint}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is not None and tag not in tags:
        raise UnknownTeacherError(
            f"open_clip model {arch!r} has no pretrained tag {tag!r} (teacher spec {spec.text!r}); "
            f"tags: {', '.join(tags) or 'none'}"
        )
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    mean, std = cfg.get("mean") or OPENAI_MEAN, cfg.get("std") or OPENAI_STD
    with torch.device("meta"):
        model = _create_architecture(arch)
    v = model.visual
    common = {"mean": [float(x) for x in mean], "std": [float(x) for x in std],
              "interpolation": cfg.get("interpolation", "bicubic"), "license": _tag_license(tag)}
    if isinstance(v, TimmModel):
        card = card_from_model(v.trunk, alias=spec.name, model_id=arch, pretrained_tag=tag, source="open_clip",
                               pretrained_cfg={"input_size": (3, *v.image_size)})
        return TeacherCard.from_dict({**card.to_dict(), **common}, origin=f"teacher spec {spec.text!r}")
    if not hasattr(v, "conv1") or getattr(v, "attn_pool", None) is not None:
        raise UnknownTeacherError(
            f"teacher spec {spec.text!r}: the visual tower of {arch} is {type(v).__name__}, not a plain ViT; "
            "unic distils ViT towers only"
        )
    width, patch = v.conv1.out_channels, v.patch_size[0]
    return TeacherCard.from_dict(
        {
            "alias": spec.name,
            "source": "open_clip",
            "model_id": arch,
            "pretrained_tag": tag,
            "family": "vit",
            "image_size": v.image_size[0],
            "patch_size": patch,
            "summary_dim": width,
            "patch_dim": width,
            "num_register_tokens": 0,
            "tokens": ["summary", "patch"],
            "summary_from": "cls" if v.pool_type == "tok" else "pool",
            **common,
        },
        origin=f"teacher spec {spec.text!r}",
    )
