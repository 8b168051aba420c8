"""HfTeacher: a HF transformers vision model; last hidden state after the final norm, registers dropped.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, P prefix tokens, D token width, h/w grid.

`hf:ORG/NAME` (a hub id) or `hf:/path/to/folder` (a folder written by `save_pretrained`) loads with
`AutoModel`; a model with a vision tower (CLIP, SigLIP) contributes only that tower. Tokens are the last hidden
state, after the final norm: DINOv2's `layernorm` is part of the model's output, CLIP's `post_layernorm` is
applied here to every token (HF applies it to the pooled token only). The prefix is [cls, registers...]
(`Dinov2WithRegisters` has 4 registers); SigLIP has no class token and its summary is the attention-pool head
(`pooler_output`). A timm model saved for the hub (`TimmWrapperModel`, a folder with timm's `config.json`)
goes through the timm adapter, so both paths give identical tokens. Model code from the hub
(`trust_remote_code`) runs only when the spec says `?trust_remote_code=true`.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from unic_cli.errors import RegistryError, UnknownTeacherError, WeightsError
from unic_cli.registry import TeacherCard, TeacherSpec
from unic_cli.teachers.timm import TimmTeacher, card_from_model
from unic_cli.teachers.weights import (
    hub_access,
    hub_error,
    mismatch_error,
    offline_hint,
    read_state_dict,
    resolve_weights_ref,
    strip_common_prefix,
    unsafe_pickle_reason,
)

log = logging.getLogger("unic_cli")

# Library facts per model type: how many class tokens lead the sequence, and which norm HF leaves off the tokens.
_NUM_CLASS_TOKENS = {"dinov2": 1, "dinov2_with_registers": 1, "vit": 1, "clip": 1, "clip_vision_model": 1,
                     "siglip": 0, "siglip_vision_model": 0, "siglip2": 0, "siglip2_vision_model": 0}
_TOKEN_NORM = {"clip": "post_layernorm", "clip_vision_model": "post_layernorm"}
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


class HfTeacher(nn.Module):
    """A HF transformers model as a Backbone.

    Args:
        card: the resolved card; checked against the model's config (widths, patch size, registers).
        model: an `AutoModel` (or its vision tower); a `TimmWrapperModel` is handed to the timm adapter.
    """

    def __init__(self, card: TeacherCard, model: nn.Module) -> None:
        super().__init__()
        self.card = card
        config = model.config
        self.model_type = config.model_type
        if self.model_type == "timm_wrapper":
            self.timm = TimmTeacher(card, model.timm_model)
            return
        self.vision = getattr(model, "vision_model", model)
        vcfg = _vision_config(config)
        self.num_class_tokens = _NUM_CLASS_TOKENS.get(self.model_type)
        norm_name = _TOKEN_NORM.get(self.model_type)
        self.token_norm = getattr(self.vision, norm_name) if norm_name else nn.Identity()
        self.pass_interpolate = "interpolate_pos_encoding" in inspect.signature(self.vision.forward).parameters
        self.native_size = int(vcfg.image_size) if hasattr(vcfg, "image_size") else None
        problems = []
        if card.family != "vit":
            problems.append(f"family is {card.family!r}, a HF {self.model_type} model is a vit")
        if card.patch_size != _as_int(vcfg.patch_size):
            problems.append(f"patch_size is {card.patch_size}, the config says {vcfg.patch_size}")
        if card.patch_dim != vcfg.hidden_size:
            problems.append(f"patch_dim is {card.patch_dim}, the config's hidden_size is {vcfg.hidden_size}")
        registers = int(getattr(vcfg, "num_register_tokens", 0) or 0)
        if self.num_class_tokens is not None and card.num_register_tokens != registers:
            problems.append(f"num_register_tokens is {card.num_register_tokens}, the config says {registers}")
        if card.has_summary:
            if card.summary_from == "cls" and self.num_class_tokens == 0:
                problems.append(f"summary_from is 'cls' but {self.model_type} has no class token (use 'pool')")
            if card.summary_from == "pool" and self.num_class_tokens != 0:
                problems.append(f"summary_from is 'pool' but {self.model_type} has no pooling head (use 'cls')")
            if card.summary_dim != vcfg.hidden_size:
                problems.append(f"summary_dim is {card.summary_dim}, the config's hidden_size is {vcfg.hidden_size}")
        if problems:
            raise RegistryError(
                f"teacher {card.alias!r} does not match the HF model {card.model_id} ({self.model_type}): "
                + "; ".join(problems)
            )

    def set_input_size(self, input_size: tuple[int, int]) -> None:
        if self.model_type == "timm_wrapper":  # HF models interpolate position embeddings in every forward
            self.timm.set_input_size(input_size)

    def forward_tokens(self, images_BCHW: torch.Tensor):
        if self.model_type == "timm_wrapper":
            return self.timm.forward_tokens(images_BCHW)
        kwargs = {}
        if self.pass_interpolate and images_BCHW.shape[-1] != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.vision(pixel_values=images_BCHW, **kwargs)
        tokens_BLD = self.token_norm(out.last_hidden_state)
        h, w = images_BCHW.shape[-2] // self.card.patch_size, images_BCHW.shape[-1] // self.card.patch_size
        num_prefix = tokens_BLD.shape[1] - h * w
        expected = None if self.num_class_tokens is None else self.num_class_tokens + self.card.num_register_tokens
        if expected is None:  # an unlisted model type: assume [cls, registers...] and check the count
            expected = (1 if self.card.summary_from == "cls" else 0) + self.card.num_register_tokens
        if num_prefix != expected:
            raise RegistryError(
                f"teacher {self.card.alias!r}: the model returns {num_prefix} prefix tokens before its {h}x{w} "
                f"patch tokens, the card implies {expected}; fix num_register_tokens / summary_from"
            )
        summary_BD = None
        if self.card.has_summary:
            summary_BD = tokens_BLD[:, 0] if self.card.summary_from == "cls" else out.pooler_output
        return summary_BD, tokens_BLD[:, num_prefix:], (h, w)


def _as_int(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _is_local(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().is_dir()


def _read_text(model_id: str, filename: str, revision: str | None) -> str | None:
    if _is_local(model_id):
        path = Path(model_id).expanduser() / filename
        return path.read_text(encoding="utf-8") if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        with hub_access(f"{model_id}/{filename}"):  # an unreachable hub: the local cache only, at once
            path = hf_hub_download(model_id, filename, revision=revision)
        return Path(path).read_text(encoding="utf-8")
    except Exception:  # absent file, gated repo or no network: these files only refine the card
        return None


_CONFIG_FIX = (
    "Without hub access, pass a folder written by save_pretrained (config.json and the weights), or a weights "
    "file with the repository's config.json next to it: --teachers '{alias}=/path/to/folder'; the card and the "
    "architecture (also for --random-init) are then read from that folder."
)


def local_config_folder(ref) -> Path | None:
    """The folder with the config.json of local HF weights: a save_pretrained folder, or a weights file's folder."""
    if ref is None or str(ref).startswith("pypi:"):
        return None
    path = Path(str(ref)).expanduser()
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def load_config(model_id: str, *, revision: str | None, trust_remote_code: bool, alias: str):
    """AutoConfig for a hub id or local folder, with user-facing errors."""
    from transformers import AutoConfig

    if _is_local(model_id) and not (Path(model_id).expanduser() / "config.json").is_file():
        raise UnknownTeacherError(
            f"teacher {alias!r}: {model_id!r} is not a folder with a config.json (write one with "
            "model.save_pretrained(folder))"
        )
    try:
        # an unreachable hub: hub_access turns on huggingface_hub's offline mode, which transformers reads as
        # local_files_only=True, so the cache is used at once instead of after huggingface_hub's retries
        with hub_access(f"the config of {model_id}"):
            config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
        if config.model_type == "timm_wrapper" and "num_classes" in (config.model_args or {}):
            # timm's save_for_hf writes num_classes into model_args too; TimmWrapperModel then passes it twice
            config.model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}
        return config
    except OSError as err:
        if _is_local(model_id):
            raise UnknownTeacherError(f"teacher {alias!r}: cannot read {model_id}/config.json ({err})") from None
        raise hub_error(alias, f"hf:{model_id}" + (f"@{revision}" if revision else ""), err, what="config",
                        fix=_CONFIG_FIX.format(alias=alias)) from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UnknownTeacherError(
                f"teacher {alias!r}: {model_id} runs its own model code from the hub, which is off by default. "
                f"If you trust it, add ?trust_remote_code=true to the spec: 'hf:{model_id}?trust_remote_code=true'"
            ) from None
        raise UnknownTeacherError(
            f"teacher {alias!r}: transformers cannot read the config of {model_id}: {err}"
        ) from None


def _timm_from_wrapper_config(config) -> nn.Module:
    import timm

    kwargs = {**(config.model_args or {}), "num_classes": 0}
    return timm.create_model(config.architecture, pretrained=False, **kwargs)


def create_model(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    """The transformers model for a card: hub or local folder, or built from its config plus a local weights file.

    Local weights with a config.json beside them (a save_pretrained folder, or a file in one) give the
    architecture for random init too, so no hub access is needed.
    """
    from transformers import AutoModel

    local = spec.weights if spec.weights is not None else card.weights
    folder = local_config_folder(local)
    trust = spec.trust_remote_code
    if pretrained and folder is not None and Path(str(local)).expanduser().is_dir():
        return _from_pretrained(AutoModel, str(folder), card, None, trust)
    if pretrained and local is None:
        return _from_pretrained(AutoModel, card.model_id, card, card.pretrained_tag, trust)
    config = _config_for(card, folder, local, trust)
    if not pretrained:
        return AutoModel.from_config(config, trust_remote_code=trust)
    return _from_weights_file(card, config, resolve_weights_ref(local), trust)


def _from_weights_file(card: TeacherCard, config, path: Path, trust: bool) -> nn.Module:
    """Load a weights file through transformers' own loading, which renames checkpoint keys to the model's.

    transformers 5 renames keys when it loads (DINOv2's `attention.attention.query` -> `attention.q_proj`) and
    writes the old names when it saves, so a raw strict load would refuse the very file save_pretrained wrote.
    The file must still fill the model exactly: missing, unexpected or misshapen keys are one error.
    """
    from transformers import AutoModel

    with torch.device("meta"):  # the key layout only; no memory, no init
        skeleton = AutoModel.from_config(config, trust_remote_code=trust)
    expected = skeleton.state_dict()
    state = strip_common_prefix(read_state_dict(path), expected)
    if not set(state) & set(expected):  # a bare timm or vision-tower state dict: add the wrapper's prefix
        for prefix in (getattr(skeleton, "base_model_prefix", ""), "vision_model"):
            if prefix and set(f"{prefix}.{k}" for k in state) & set(expected):
                state = {f"{prefix}.{k}": v for k, v in state.items()}
                break
    optional = _optional_key(skeleton)
    with _quiet_transformers():  # its load report would repeat, less clearly, the error raised below
        model, info = type(skeleton).from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                                     ignore_mismatched_sizes=True)
    missing = sorted(k for k in info["missing_keys"] if not optional(k))
    unexpected = sorted(k for k in info["unexpected_keys"] if not optional(k))
    mismatched = [f"{k} (file {tuple(a)}, model {tuple(b)})" for k, a, b in sorted(info["mismatched_keys"])]
    if missing or unexpected or mismatched:
        raise mismatch_error(type(model).__name__, str(path), missing, unexpected, mismatched)
    log.info("teacher %s: loaded %s", card.alias, path)
    return model


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _optional_key(model: nn.Module):
    """Keys a vision teacher may lack: a text tower, logit scale, or a timm classifier it drops."""
    if getattr(model.config, "model_type", "") == "timm_wrapper":
        return lambda k: k.startswith("timm_model.") and re.match(r"timm_model\.(classifier|head|fc)\.", k) is not None
    if hasattr(model, "vision_model"):
        return lambda k: not k.startswith("vision_model.")
    return lambda k: False


def _config_for(card: TeacherCard, folder: Path | None, local, trust: bool):
    """The config for building without hub weights: beside the local weights, else the hub (or its cache)."""
    if folder is not None:
        return load_config(str(folder), revision=None, trust_remote_code=trust, alias=card.alias)
    try:
        return load_config(card.model_id, revision=card.pretrained_tag, trust_remote_code=trust, alias=card.alias)
    except WeightsError as err:
        if local is None or str(local).startswith("pypi:"):
            raise
        cannot = str(err).splitlines()[0]  # "cannot download the config of teacher ...: reason"
        raise WeightsError(
            f"{cannot}\nThe architecture comes from that config, and there is no config.json next to "
            f"{str(local)!r}: put the repository's config.json there, or pass the whole folder written by "
            f"save_pretrained: --teachers '{card.alias}=/path/to/folder'{offline_hint()}"
        ) from None


def _from_pretrained(auto_cls, model_id: str, card: TeacherCard, revision: str | None, trust: bool) -> nn.Module:
    config = load_config(model_id, revision=revision, trust_remote_code=trust, alias=card.alias)
    try:
        with hub_access(f"the weights of {model_id}"):  # offline mode when the hub does not answer, as above
            model, info = auto_cls.from_pretrained(model_id, config=config, revision=revision,
                                                   trust_remote_code=trust, output_loading_info=True)
    except pickle.UnpicklingError as err:  # transformers' torch.load(weights_only=True) refused a pickled object
        raise WeightsError(f"teacher {card.alias!r}: refusing the weights of {model_id}: "
                           f"{unsafe_pickle_reason(err) or err}") from None
    except OSError as err:
        if _is_local(model_id):
            raise WeightsError(f"teacher {card.alias!r}: cannot load the folder {model_id}: {err}") from None
        raise hub_error(card.alias, f"hf:{model_id}" + (f"@{revision}" if revision else ""), err) from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise UnknownTeacherError(
                f"teacher {card.alias!r}: {model_id} needs its own code from the hub; if you trust it, add "
                "?trust_remote_code=true to the spec"
            ) from None
        raise
    # transformers initialises missing weights at random with a warning; a teacher must not be silently random
    optional = _optional_key(model)
    missing = [k for k in info.get("missing_keys", ()) if not optional(k)]
    mismatched = [str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise WeightsError(
            f"teacher {card.alias!r}: the weights of {model_id} do not fill the {type(model).__name__} architecture: "
            f"missing {len(missing)} key(s) {missing[:8]}, {len(mismatched)} shape mismatch(es) {mismatched[:8]}"
        )
    return model


def build_backbone(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    """The Backbone for a HF card or `hf:` spec."""
    return HfTeacher(card, create_model(card, spec, pretrained=pretrained))


def _read_extra(source: str, model_id: str, revision: str | None, filename: str) -> str | None:
    """A file that refines the card: from the local weights' folder, else from the model the spec names."""
    text = _read_text(source, filename, None if source != model_id else revision)
    if text is None and source != model_id:
        text = _read_text(model_id, filename, revision)
    return text


def _license(text: str | None) -> str:
    text = text or ""
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    match = re.search(r"^license:\s*([\w.\-]+)\s*$", front, flags=re.MULTILINE)
    return match.group(1) if match else "unknown"


def card_from_spec(spec: TeacherSpec) -> TeacherCard:
    """A card for `hf:ORG/NAME[@REVISION]` or `hf:/local/folder`, from config.json and preprocessor_config.json."""
    model_id, _, revision = spec.target.partition("@")
    revision = revision or None
    # local weights with their config.json: the card comes from there, so no hub access is needed
    folder = local_config_folder(spec.weights)
    source, source_revision = (str(folder), None) if folder is not None else (model_id, revision)
    config = load_config(source, revision=source_revision, trust_remote_code=spec.trust_remote_code, alias=spec.name)
    if config.model_type == "timm_wrapper":
        with torch.device("meta"):
            timm_model = _timm_from_wrapper_config(config)
        card = card_from_model(timm_model, alias=spec.name, model_id=model_id, pretrained_tag=revision, source="hf",
                               pretrained_cfg=config.pretrained_cfg or {})
        license_ = _license(_read_extra(source, model_id, revision, "README.md"))
        return TeacherCard.from_dict({**card.to_dict(), "license": license_}, origin=spec.text)
    vcfg = _vision_config(config)
    for name in ("hidden_size", "patch_size", "image_size"):
        if not hasattr(vcfg, name):
            raise UnknownTeacherError(
                f"teacher {spec.name!r}: {model_id} ({config.model_type}) is not a ViT-like vision model (its config "
                f"has no {name}); use `py:MODULE:CALLABLE` to wrap it"
            )
    num_class_tokens = _NUM_CLASS_TOKENS.get(config.model_type, 1)
    if num_class_tokens:
        tokens, summary_from = ["summary", "patch"], "cls"
    elif getattr(vcfg, "vision_use_head", False):
        tokens, summary_from = ["summary", "patch"], "pool"
    else:
        tokens, summary_from = ["patch"], "cls"
    processor = _read_extra(source, model_id, revision, "preprocessor_config.json")
    processor = json.loads(processor) if processor else {}
    mean = processor.get("image_mean") or _IMAGENET[0]
    std = processor.get("image_std") or _IMAGENET[1]
    if "image_mean" not in processor:
        log.warning("teacher %s: no preprocessor_config.json in %s; assuming ImageNet mean/std (set them with "
                    "?mean=...&std=...)", spec.name, source)
    patch_size, image_size = _as_int(vcfg.patch_size), _as_int(vcfg.image_size)
    return TeacherCard.from_dict(
        {
            "alias": spec.name,
            "source": "hf",
            "model_id": model_id,
            "pretrained_tag": revision,
            "family": "vit",
            "image_size": image_size // patch_size * patch_size,
            "patch_size": patch_size,
            "summary_dim": vcfg.hidden_size if "summary" in tokens else None,
            "patch_dim": vcfg.hidden_size,
            "num_register_tokens": int(getattr(vcfg, "num_register_tokens", 0) or 0),
            "tokens": tokens,
            "summary_from": summary_from,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "interpolation": _RESAMPLE.get(processor.get("resample"), "bicubic"),
            "license": _license(_read_extra(source, model_id, revision, "README.md")),
        },
        origin=f"teacher spec {spec.text!r}",
    )

