"""export_student -> model.safetensors + config.json (timm local-dir layout); load_student reads it back.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D token width, P prefix tokens (cls + registers).

An exported folder holds:

    model.safetensors   the student encoder's plain timm state dict: no projector, standardiser,
                        optimiser or classifier tensors
    config.json         timm's hub layout (architecture, num_classes 0, model_args, pretrained_cfg with the
                        preprocessing), so `timm.create_model("local-dir:DIR", pretrained=True)` and
                        `transformers.AutoModel.from_pretrained(DIR)` (its TimmWrapperModel) both load it
    unic.json           provenance: teachers, licences, training config and step, unic version, source sha256
    README.md           a model card with usage lines, the teachers table, the licence and this export's probe
                        results (RUN/probe.json)
    heads.safetensors   only with `keep_heads`: the chosen teachers' ladder heads and standardiser statistics

The ladder heads are re-implemented here (one Linear-GELU-Linear per tapped block, summed) so that an exported
folder stands on its own: `load_student` and `unic probe` never import the training code.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from unic_cli import __version__
from unic_cli.errors import CheckpointError, ExportError, ExportVerificationError
from unic_cli.teachers.base import TeacherTokens

log = logging.getLogger("unic_cli")

CHECKPOINT_FORMAT = "unic-checkpoint"
EXPORT_FORMAT = "unic-student"
HEADS_FORMAT = "unic-heads"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
HEADS_FILE = "heads.safetensors"
VERIFY_ATOL = 1e-5  # fp32 on the same device: the reload must reproduce the checkpoint's tokens
_REQUIRED_KEYS = ("step", "config", "teachers", "student")
_STUDENT_KEYS = ("name", "state_dict", "image_size", "mean", "std")
_TRAINING_ONLY_ARGS = ("num_classes", "pretrained", "pretrained_cfg", "features_only")
# Licence ids that forbid commercial use: cc-by-nc-*, "non-commercial", "research-only" and the like.
_NON_COMMERCIAL = re.compile(r"(^|[^a-z])nc([^a-z]|$)|non[-_ ]?commercial|research[-_ ]?only", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file for a path: the file itself, or a run folder's latest checkpoint.

    A run folder (or its `checkpoints/` folder) resolves to `checkpoints/last.pt` when present, otherwise to the
    `step_*.pt` with the highest step (the same rule as `unic distill --resume`).
    """
    from unic_cli.checkpoint import find_checkpoint as find_in_run

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist; give a `unic distill` run folder or a checkpoint file")
    found = find_in_run(path)
    if found is None:
        raise CheckpointError(
            f"{str(path)!r} holds no checkpoint (looked for checkpoints/last.pt and checkpoints/step_*.pt); "
            "give a `unic distill` run folder or a checkpoint file"
        )
    return found


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str, Path]:
    """A `unic distill` checkpoint loaded on the CPU (weights_only) and checked, the sha256 of exactly the bytes
    loaded, and a stable name for them.

    One open file serves the hash and the load: a run that is still training replaces `last.pt` (and may
    prune old `step_*.pt`) at any time, and an open file keeps its bytes, so the sha256 and step recorded in
    `unic.json` always describe the weights exported. The stable name is the `step_*.pt` that `last.pt` is a hard
    link to (where there is one): `last.pt` itself moves on with the run.
    """
    not_unic = f"{str(path)!r} is not a unic checkpoint"
    try:
        f = open(path, "rb")
    except FileNotFoundError:  # e.g. pruned by a running `unic distill --keep-checkpoints` since it was found
        raise CheckpointError(f"{str(path)!r} no longer exists (a running `unic distill` may have pruned it); "
                              "export the run folder, or a step it keeps") from None
    with f:
        magic = f.read(4)
        if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
            raise CheckpointError(f"{not_unic} (not a PyTorch file); give a file written by `unic distill`")
        f.seek(0)
        sha256 = _sha256_of(f)
        f.seek(0)
        stable = _stable_name(path, os.fstat(f.fileno()))
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: one message only
                warnings.simplefilter("ignore")
                ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch errors all mean "not a checkpoint we can read"
            from unic_cli.teachers.weights import unsafe_pickle_reason

            reason = unsafe_pickle_reason(err) or "a damaged PyTorch file"
            raise CheckpointError(f"{not_unic} ({reason}); give a file written by `unic distill`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{not_unic} (found {found}); give a file written by `unic distill`")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint format {ckpt['format_version']}, newer than this unic "
                              f"({__version__}) reads ({FORMAT_VERSION}); upgrade unic")
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    missing += [f"student.{k}" for k in _STUDENT_KEYS if k not in ckpt.get("student", {})]
    if missing:
        raise CheckpointError(f"{str(path)!r} is an incomplete unic checkpoint: missing {missing}")
    return ckpt, sha256, stable


def _stable_name(path: Path, opened: os.stat_result) -> Path:
    """The `step_*.pt` beside `path` that is the same file as the one opened (`last.pt` is a hard link to the
    newest step), else `path`."""
    if not Path(path).name.startswith("step_"):
        for candidate in sorted(Path(path).parent.glob("step_*.pt"), reverse=True):
            try:
                st = candidate.stat()
            except OSError:  # pruned meanwhile
                continue
            if (st.st_ino, st.st_dev) == (opened.st_ino, opened.st_dev):
                return candidate
    return Path(path)


def _sha256_of(f) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The encoder and its tokens


def _model_args(student: dict[str, Any]) -> dict[str, Any]:
    """Architecture arguments only: no classifier, no drop rates (they do not change the weights' meaning)."""
    args = {k: v for k, v in dict(student.get("model_args") or {}).items()
            if k not in _TRAINING_ONLY_ARGS and not k.endswith("drop_rate") and not k.endswith("drop_path_rate")}
    args["img_size"] = int(student["image_size"])
    return args


def build_encoder(student: dict[str, Any]) -> nn.Module:
    """The timm encoder (no classifier) described by a checkpoint's `student` entry, with its weights."""
    import timm

    model = timm.create_model(student["name"], pretrained=False, num_classes=0, **_model_args(student))
    state = dict(student["state_dict"])
    # A classifier trained elsewhere is not part of the encoder; everything else must match exactly.
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    for key in [k for k in state if k.startswith(f"{classifier}.")]:
        state.pop(key)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _num_summary_tokens(model: nn.Module) -> int:
    """Class tokens in front of the registers (0 or 1 for timm ViTs)."""
    return int(getattr(model, "num_prefix_tokens", 0)) - int(getattr(model, "num_reg_tokens", 0))


# Pooling-side modules that training never reaches (unic_cli.student.Student freezes them): not exported.
_UNTRAINED_POOLING = ("attn_pool", "fc_norm")


def _pooling_args(model: nn.Module) -> dict[str, Any]:
    """model_args whose pooled output (`model(x)`, transformers' `pooler_output`) is the distilled summary.

    Training taps the last block through `model.norm` (an Identity when the architecture puts its norm after the
    pooling, as `global_pool='avg'` does by default) and takes the class token, or the mean patch token. An
    attention pool (`map`) or a post-pool `fc_norm` never gets a gradient, so the export turns both off and
    keeps `model.norm` exactly as trained.
    """
    pool = "token" if _num_summary_tokens(model) > 0 else "avg"
    has_norm = not isinstance(model.norm, nn.Identity)
    if type(model).__name__ == "Eva":  # Eva always averages without the prefix tokens
        return {"global_pool": pool, "use_fc_norm": False, "use_post_transformer_norm": has_norm}
    args = {"global_pool": pool, "fc_norm": False}
    if not has_norm:
        args["final_norm"] = False  # else VisionTransformer builds a fresh, untrained norm
    if getattr(model, "pool_include_prefix", False):
        args["pool_include_prefix"] = False  # the summary averages patch tokens only, never the registers
    return args


def _export_encoder(student: dict[str, Any], model: nn.Module) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The encoder as exported: `model` rebuilt with `_pooling_args`, loaded strictly without its untrained
    pooling modules. Returns (encoder, model_args for config.json, the dropped modules' names)."""
    import timm

    model_args = {**_model_args(student), **_pooling_args(model)}
    try:
        encoder = timm.create_model(student["name"], pretrained=False, num_classes=0, **model_args)
    except TypeError as err:  # e.g. a timm without VisionTransformer(final_norm=...)
        raise ExportError(f"timm cannot build {student['name']!r} with {model_args} ({err}); upgrade timm") from None
    state = model.state_dict()
    dropped = sorted({k.split(".")[0] for k in state.keys() - encoder.state_dict().keys()})
    assert set(dropped) <= set(_UNTRAINED_POOLING), f"export would drop trained weights of {dropped}"
    encoder.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] not in dropped}, strict=True)
    return encoder.eval(), model_args, dropped


def student_taps(model: nn.Module, images_BCHW: torch.Tensor, blocks: tuple[int, ...] | list[int]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(summary_BD, patch_BND) after the final norm, for each tapped block, in `blocks` order.

    The summary is the class token, or the mean patch token for a ViT without one; register tokens are
    dropped. Same semantics as the training student (`unic_cli.student.Student`).
    """
    depth = len(model.blocks)
    wanted = [b % depth for b in blocks]
    order = sorted(set(wanted))
    outs = model.forward_intermediates(images_BCHW, indices=order, norm=True, return_prefix_tokens=True,
                                       output_fmt="NLC", intermediates_only=True, stop_early=True)
    num_cls = _num_summary_tokens(model)
    by_block = {}
    for b, out in zip(order, outs):
        patch_BND, prefix_BPD = out if isinstance(out, tuple) else (out, None)
        summary_BD = prefix_BPD[:, 0] if num_cls > 0 else patch_BND.mean(dim=1)
        by_block[b] = (summary_BD, patch_BND)
    return [by_block[b] for b in wanted]


def student_tokens(model: nn.Module, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summary_BD, patch_BND) of the last block: what `forward_features` returns, split."""
    [(summary_BD, patch_BND)] = student_taps(model, images_BCHW, [len(model.blocks) - 1])
    return summary_BD, patch_BND


def _preprocess(images_BCHW: torch.Tensor, *, image_size: int, mean: torch.Tensor, std: torch.Tensor,
                interpolation: str) -> torch.Tensor:
    """uint8 [0, 255] pixels -> resized and normalised; float input is taken as already normalised."""
    if images_BCHW.dtype != torch.uint8:
        return images_BCHW
    x = images_BCHW.float() / 255.0
    if tuple(x.shape[-2:]) != (image_size, image_size):
        smooth = interpolation in ("bilinear", "bicubic")
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode=interpolation, antialias=smooth,
                                      align_corners=False if smooth else None)
    return (x - mean.to(x.device).view(1, 3, 1, 1)) / std.to(x.device).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# Teacher heads (a self-contained copy of the ladder's inference path)


class _Mlp(nn.Module):
    """Linear-GELU-Linear with the ladder's submodule names, so its state dict loads as is."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BND)))


def _build_ladder(state: dict[str, torch.Tensor], prefix: str, blocks: list[int]) -> nn.ModuleDict:
    """One _Mlp per tapped block from keys `{prefix}.b{block}.fc{1,2}.{weight,bias}`."""
    ladder = nn.ModuleDict()
    for b in blocks:
        key = f"{prefix}.b{b}"
        w1, w2 = state[f"{key}.fc1.weight"], state[f"{key}.fc2.weight"]
        mlp = _Mlp(w1.shape[1], w1.shape[0], w2.shape[0])
        mlp.load_state_dict({k.removeprefix(f"{key}."): v for k, v in state.items() if k.startswith(f"{key}.")})
        ladder[f"b{b}"] = mlp
    return ladder


class TeacherHead(nn.Module):
    """Maps student images (or the student's tapped tokens) into one teacher's feature space.

    The prediction for each token type is the sum over tapped blocks of that block's MLP applied to the
    block's tokens (UNIC paper, "ladder of projectors"), then un-standardised with the teacher's running
    statistics: y = pred * sqrt(var + eps) + mean, so it is comparable with the teacher's raw tokens.

    Call it with images: uint8 [0, 255] pixels (any size; resized and normalised here) or float tensors that
    are already the student's transform output (resized, normalised). Use `from_taps` when you already have
    `student_taps(encoder, images, head.blocks)`. Both run under no_grad: this is an inference API.

    Attributes:
        alias: the teacher's alias (or spec) in the run.
        card: the teacher's resolved card, as a dict.
        blocks: the tapped student blocks (0-based).
        token_types: which of "summary" / "patch" this head predicts.
    """

    def __init__(self, *, encoder: nn.Module, alias: str, card: dict[str, Any], blocks: list[int],
                 state: dict[str, torch.Tensor], key: str, shared: bool, standardize: bool, eps: float,
                 image_size: int, mean: list[float], std: list[float], interpolation: str) -> None:
        super().__init__()
        self.encoder = encoder  # shared with LoadedStudent.model, not a copy
        self.alias, self.card, self.blocks = alias, card, list(blocks)
        self.eps, self.standardize = eps, standardize
        self.image_size, self.interpolation = image_size, interpolation
        self.register_buffer("mean_C", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std_C", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.ladders = nn.ModuleDict()
        has_summary = "summary" in card.get("tokens", ("summary", "patch")) and card.get("summary_dim") is not None
        self.token_types = ("summary", "patch") if has_summary else ("patch",)
        for token_type in self.token_types:
            head = "shared" if shared else token_type
            self.ladders[token_type] = _build_ladder(state, f"heads.{key}.{head}", self.blocks)
            mean_D = state.get(f"standardizers.{key}.{token_type}.mean_D")
            var_D = state.get(f"standardizers.{key}.{token_type}.var_D")
            if standardize and (mean_D is None or var_D is None):
                raise ExportError(f"teacher {alias!r}: standardiser statistics for {token_type} tokens are missing")
            out_dim = self.ladders[token_type][f"b{self.blocks[0]}"].fc2.out_features
            self.register_buffer(f"{token_type}_mean_D", mean_D if mean_D is not None else torch.zeros(out_dim))
            self.register_buffer(f"{token_type}_var_D", var_D if var_D is not None else torch.ones(out_dim))

    def _project(self, token_type: str, taps: list[torch.Tensor]) -> torch.Tensor:
        ladder = self.ladders[token_type]
        pred = sum(ladder[f"b{b}"](x) for b, x in zip(self.blocks, taps))
        if not self.standardize:
            return pred
        mean_D, var_D = getattr(self, f"{token_type}_mean_D"), getattr(self, f"{token_type}_var_D")
        return pred * torch.sqrt(var_D + self.eps) + mean_D

    @torch.no_grad()
    def from_taps(self, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> TeacherTokens:
        """Teacher-space tokens from the student's (summary_BD, patch_BND) per tapped block."""
        summary_BD = self._project("summary", [s for s, _ in taps]) if "summary" in self.token_types else None
        patch_BND = self._project("patch", [p for _, p in taps]) if "patch" in self.token_types else None
        return TeacherTokens(summary_BD, patch_BND)

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor) -> TeacherTokens:
        x = _preprocess(images_BCHW, image_size=self.image_size, mean=self.mean_C, std=self.std_C,
                        interpolation=self.interpolation)
        return self.from_taps(student_taps(self.encoder, x, self.blocks))


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _licence_summary(cards: list[dict[str, Any]]) -> dict[str, Any]:
    licenses = sorted({str(c.get("license") or "unknown") for c in cards})
    nc = sorted({c["alias"] for c in cards if _NON_COMMERCIAL.search(str(c.get("license") or ""))})
    unknown = sorted({c["alias"] for c in cards if str(c.get("license") or "unknown").lower() in ("unknown", "")})
    if nc:
        note = (f"NON-COMMERCIAL: distilled from {', '.join(nc)}, whose licence forbids commercial use; this "
                f"student inherits that restriction. All teacher licences: {', '.join(licenses)}.")
    else:
        note = f"Distilled from teachers under: {', '.join(licenses)}. Check each licence's terms before use."
    if unknown:
        note += f" Licence unknown for {', '.join(unknown)}: treat as restricted until checked."
    return {"licenses": licenses, "non_commercial": bool(nc), "non_commercial_teachers": nc, "license_note": note}


def _timm_config(student: dict[str, Any], model: nn.Module, model_args: dict[str, Any]) -> dict[str, Any]:
    """config.json in timm's hub layout (what `timm.models.save_for_hf` writes), for timm and transformers;
    `model` is the exported encoder and `model_args` the arguments it was built with."""
    size = int(student["image_size"])
    pretrained_cfg = {
        "input_size": [3, size, size],
        "fixed_input_size": not bool(getattr(model, "dynamic_img_size", False)),
        "interpolation": student.get("interpolation", "bicubic"),
        "crop_pct": 1.0,  # trained on whole images resized to image_size: no centre-crop margin
        "crop_mode": "center",
        "mean": [float(v) for v in student["mean"]],
        "std": [float(v) for v in student["std"]],
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    # transformers' TimmWrapperModel passes num_classes=0 itself: model_args must not repeat it.
    return {
        "architecture": student["name"],
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def _resolve_keep_heads(keep: tuple[str, ...], ckpt: dict[str, Any]) -> list[tuple[int, str]]:
    """(teacher index, alias) for each requested alias; accepts card aliases, specs as typed, or t{i}."""
    cards, specs = ckpt["teachers"], list(ckpt.get("teacher_specs") or [])
    names: dict[str, int] = {}
    for i, card in enumerate(cards):
        names.setdefault(card["alias"], i)
        if i < len(specs):
            names.setdefault(specs[i], i)
        names.setdefault(f"t{i}", i)
    chosen, problems = [], []
    for alias in keep:
        if alias not in names:
            known = list(dict.fromkeys([c["alias"] for c in cards] + specs))
            close = difflib.get_close_matches(alias, known, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            problems.append(f"--keep-heads {alias!r} is not a teacher of this run.{hint} "
                            f"The run's teachers: {', '.join(c['alias'] for c in cards)}")
        elif names[alias] not in [i for i, _ in chosen]:
            chosen.append((names[alias], cards[names[alias]]["alias"]))
    if problems:
        raise ExportError("\n".join(problems) if len(problems) == 1 else
                          f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    if chosen and "ladder" not in ckpt:
        raise ExportError("this checkpoint holds no ladder heads; export without --keep-heads")
    return chosen


def _heads_state(ckpt: dict[str, Any], chosen: list[tuple[int, str]]) -> dict[str, torch.Tensor]:
    prefixes = tuple(p for i, _ in chosen for p in (f"heads.t{i}.", f"standardizers.t{i}."))
    ladder = {k if k.startswith("heads.") else f"heads.{k}": v for k, v in ckpt["ladder"].items()}
    std = {k if k.startswith("standardizers.") else f"standardizers.{k}": v
           for k, v in (ckpt.get("standardizers") or {}).items()}
    return {k: v.detach().float().contiguous() for k, v in {**ladder, **std}.items() if k.startswith(prefixes)}


def _heads_meta(ckpt: dict[str, Any], chosen: list[tuple[int, str]]) -> dict[str, Any]:
    meta = dict(ckpt.get("ladder_meta") or {})
    return {
        "format": HEADS_FORMAT,
        "format_version": FORMAT_VERSION,
        "blocks": [int(b) for b in meta.get("blocks", [])],
        "shared_heads": bool(meta.get("shared_heads", False)),
        "standardize": bool(meta.get("standardize", True)),
        "std_eps": float(meta.get("std_eps", 1e-6)),
        "teachers": [{"alias": alias, "key": f"t{i}", "card": ckpt["teachers"][i]} for i, alias in chosen],
    }


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _probe_rows(probe: Any) -> list[dict[str, Any]] | None:
    """The flat rows of `RUN/probe.json` (a list of rows, or a report holding one under rows/results/table)."""
    rows = probe
    if isinstance(probe, dict):
        rows = next((probe[k] for k in ("rows", "results", "table") if isinstance(probe.get(k), list)), None)
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        return [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
    return None


def _probed_source_sha256(entry: Any) -> str | None:
    """The source checkpoint sha256 that probe.json records for a student model, if it records one."""
    if not isinstance(entry, dict):
        return None
    source = entry.get("source_checkpoint")
    sha = source.get("sha256") if isinstance(source, dict) else entry.get("source_sha256")
    return sha if isinstance(sha, str) else None


def _probe_section(probe: Any, sha256: str) -> list[str]:
    """The model card's probe section: only rows of this export where probe.json says which export a row is.

    probe.json names a student by the folder it probed; a folder can hold another step's export, or be
    overwritten later. Where the report records each student's source checkpoint sha256, only this export's rows
    (and the teachers') are kept; otherwise the section says the rows were measured on the run's exports.
    """
    rows = _probe_rows(probe)
    if rows is None:
        return ["## Probe report (measured on the run's exports)", "",
                "`RUN/probe.json` as found; it does not say which export each result was measured on.", "",
                "```json\n" + json.dumps(probe, indent=2)[:4000] + "\n```", ""]
    models = probe.get("models") if isinstance(probe, dict) and isinstance(probe.get("models"), dict) else {}
    sources = {m: _probed_source_sha256(e) for m, e in models.items()}
    kinds = {str(r.get("model")): r.get("kind") for r in rows}
    students = [m for m, k in kinds.items() if k not in ("teacher", "baseline")]  # baseline: random init
    if not any(sources.values()):
        return ["## Probe report (measured on the run's exports)", "",
                f"Measured by `unic probe --run` on the run's exports ({', '.join(students)}), not necessarily on "
                "this checkpoint: `RUN/probe.json` does not record which checkpoint each export came from.", "",
                _markdown_table(rows), ""]
    mine = [m for m in students if sources.get(m) == sha256]
    others = [m for m in students if m not in mine]
    baselines = [m for m, k in kinds.items() if k == "baseline"]
    kept = [r for r in rows if r.get("kind") == "teacher" or str(r.get("model")) in mine]
    lines = ["## Probe report", ""]
    if mine:
        teachers = " and on the teachers" if any(r.get("kind") == "teacher" for r in kept) else ""
        lines += [f"Measured on this export (probed as {', '.join(mine)}; its source checkpoint sha256 "
                  f"matches){teachers}."]
    else:
        lines += ["`RUN/probe.json` holds no result for this export; probe it with `unic probe THIS_FOLDER --run RUN`."]
    left_out = ([f"results of other exports or steps ({', '.join(others)})"] if others else []) + (
        [f"random-init baselines ({', '.join(baselines)})"] if baselines else [])
    if left_out:
        lines += [f"Left out: {'; '.join(left_out)}."]
    lines += [""]
    if kept:
        lines += [_markdown_table(kept), ""]
    return lines


def _step_text(info: dict[str, Any]) -> str:
    if info.get("total_steps") is None:
        return f"step {info['step']}"
    return f"step {info['step']} of {info['total_steps']}" + ("" if info.get("finished") else " (unfinished run)")


def _plain_timm_call(timm_config: dict[str, Any], folder: str = "PATH/TO/THIS/FOLDER") -> str:
    """The `timm.create_model(NAME, pretrained_cfg_overlay=dict(file=...))` line that loads this export exactly."""
    py = lambda v: f'"{v}"' if isinstance(v, str) else repr(tuple(v) if isinstance(v, list) else v)  # noqa: E731
    cfg = timm_config["pretrained_cfg"]
    args = ", ".join(f"{k}={py(v)}" for k, v in timm_config["model_args"].items())
    overlay = ", ".join(f"{k}={py(cfg[k])}" for k in ("input_size", "mean", "std", "interpolation", "crop_pct"))
    return (f'plain = timm.create_model("{timm_config["architecture"]}", pretrained=True, num_classes=0, {args},\n'
            f'    pretrained_cfg_overlay=dict(file="{folder}/model.safetensors", {overlay}))')


def _model_card(info: dict[str, Any], probe: Any, timm_config: dict[str, Any]) -> str:
    s, lic = info["student"], info["license"]
    hf_license = lic["licenses"][0] if len(lic["licenses"]) == 1 and lic["licenses"][0] != "unknown" else "other"
    teachers_rows = [{"alias": t["alias"], "source": t["source"], "model": t["model_id"] + (
        f" ({t['pretrained_tag']})" if t.get("pretrained_tag") else ""), "licence": t["license"],
        "paper": t.get("paper") or ""} for t in info["teachers"]]
    heads = info.get("heads") or {}
    lines = [
        "---",
        "library_name: timm",
        f"license: {hf_license}",
        *([f"license_name: {' + '.join(lic['licenses'])}"] if hf_license == "other" else []),
        "tags: [image-feature-extraction, timm, unic, distillation]",
        "---",
        "",
        f"# {s['name']} distilled with unic",
        "",
        f"A plain `{s['name']}` encoder ({s['image_size']} px, patch {s['patch_size']}, {s['embed_dim']}-d, "
        f"{s['num_blocks']} blocks) distilled from {len(info['teachers'])} teacher(s) with "
        f"[UNIC](https://arxiv.org/abs/2408.17064) by unic {info['unic_version']}, {_step_text(info)}.",
        "",
        f"**Licence.** {lic['license_note']}",
        "",
        "## Usage",
        "",
        "```python",
        "import timm, torch",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()  # num_classes=N: new head',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)  # PIL image -> normalised tensor",
        "tokens = model.forward_features(transform(image)[None])  # [1, prefix + patches, D]",
        f"summary = model(transform(image)[None])  # [1, D]: the distilled summary ({s['pooled_output']})",
        "",
        "# Plain timm without local-dir: pass config.json's model_args (image size, pooling), or timm silently",
        "# resamples pos_embed to the architecture's default size and pools with untrained layers",
        _plain_timm_call(timm_config),
        "",
        "from transformers import AutoModel",
        'hf_model = AutoModel.from_pretrained("PATH/TO/THIS/FOLDER")  # .last_hidden_state, .pooler_output (summary)',
        "",
        "import unic_cli",
        'student = unic_cli.load_student("PATH/TO/THIS/FOLDER")  # .model, .transform, .heads',
        "```",
        "",
    ]
    if heads:
        lines += [f"`heads.safetensors` keeps the projector heads of: {', '.join(heads['teachers'])}. "
                  "`student.heads[alias](images)` maps images into that teacher's feature space "
                  "(un-standardised), e.g. for zero-shot classification with a CLIP teacher's text tower.", ""]
    lines += ["## Teachers", "", _markdown_table(teachers_rows), ""]
    metrics = (info.get("last_metrics") or {}).get("teachers") or {}
    if metrics:
        rows = [{"teacher": info["teachers"][int(k[1:])]["alias"] if re.fullmatch(r"t\d+", k)
                 and int(k[1:]) < len(info["teachers"]) else k,
                 **{m: v for m, v in d.items() if isinstance(v, (int, float))}} for k, d in metrics.items()]
        lines += ["## Training (last logged step)", "", _markdown_table(rows), ""]
    if probe is not None:
        lines += _probe_section(probe, info["source_checkpoint"]["sha256"])
    lines += ["## Provenance", "", f"Exported from `{info['source_checkpoint']['path']}` "
              f"(sha256 `{info['source_checkpoint']['sha256']}`); the full training config is in `unic.json`.", ""]
    return "\n".join(lines)


def _run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _read_probe_report(path: Path) -> Any:
    """The run's `probe.json` for the model card, or None when it is absent or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable probe report %s (%s)", path, err)
        return None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise ExportError(f"{str(out_dir)!r} already exists; pass --overwrite to replace it, or choose another --out")
    if not _is_unic_export(out_dir):
        # --overwrite replaces an earlier export, never an unrelated folder or file
        raise ExportError(f"{str(out_dir)!r} exists and is not a unic export (no unic.json written by `unic export`); "
                          "refusing to replace it even with --overwrite; choose another --out")


def _is_unic_export(folder: Path) -> bool:
    """Whether `folder` holds a unic.json that `unic export` wrote (any version): a stray or empty file of that
    name does not make a folder replaceable."""
    try:
        info = json.loads((folder / "unic.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return folder.is_dir() and isinstance(info, dict) and info.get("format") == EXPORT_FORMAT


def _share_like_a_new_folder(folder: Path) -> None:
    """Give `folder` and its files the permissions of a freshly made folder and files (0o777 / 0o666 less the
    umask): mkdtemp makes it owner-only (0o700) and safetensors writes owner-only (0o600) files, so an export on
    a shared disk would otherwise be unreadable by the rest of the team."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the verified `tmp` to `out_dir`; an earlier export there is renamed aside first and deleted only
    after the new one is in place, so an interruption never leaves `out_dir` with neither export."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f"{tmp.name}.old")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def export_student(checkpoint_or_run: str | Path, out_dir: str | Path, *, keep_heads: str | tuple[str, ...] = (),
                   overwrite: bool = False) -> Path:
    """Write a projector-free student folder that timm and transformers load as is, and verify it.

    Args:
        checkpoint_or_run: a `unic distill` checkpoint (final or intermediate), or a run folder (its latest
            checkpoint: `checkpoints/last.pt`, else the highest `step_*.pt`).
        out_dir: the folder to write; it must not exist (or be empty) unless `overwrite`.
        keep_heads: teacher aliases (card aliases, specs as typed, or `t0`, `t1`, ...) whose ladder heads and
            standardiser statistics go to `heads.safetensors`; one alias may be given as a plain string.
        overwrite: replace an earlier export at `out_dir`.

    Returns:
        `out_dir`.

    Example:
        >>> export_student("runs/a", "students/a", keep_heads=("metaclip_h",))
    """
    out_dir = Path(out_dir).expanduser()
    checkpoint = find_checkpoint(Path(checkpoint_or_run))
    _check_out_dir(out_dir, overwrite)
    ckpt, sha256, stable = read_checkpoint(checkpoint)
    # one alias given as a string is one teacher, not a tuple of its characters ("t0" -> ("t", "0"))
    chosen = _resolve_keep_heads((keep_heads,) if isinstance(keep_heads, str) else tuple(keep_heads), ckpt)
    student = ckpt["student"]
    try:
        model = build_encoder(student)
    except Exception as err:  # the architecture cannot hold these weights: a damaged or foreign file
        raise CheckpointError(f"{str(checkpoint)!r}: the student weights do not fit {student['name']!r} ({err})"
                              ) from None
    encoder, model_args, dropped = _export_encoder(student, model)
    step = int(ckpt["step"])
    total_steps = (ckpt.get("scheduler") or {}).get("total_steps")  # `unic distill` records it; None: unknown
    finished = None if total_steps is None else step >= int(total_steps)
    log.info("exporting %s (step %d) to %s", checkpoint, step, out_dir)
    if finished is False:
        log.warning("%s is at step %d of %d: the run has not finished (interrupted, or still running); "
                    "exporting it as it is", checkpoint, step, total_steps)

    cards = [dict(c) for c in ckpt["teachers"]]
    specs = list(ckpt.get("teacher_specs") or [c["alias"] for c in cards])
    info = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "unic_version": __version__,
        "step": step,
        "total_steps": None if total_steps is None else int(total_steps),
        "finished": finished,
        "source_checkpoint": {"path": str(stable.resolve()), "sha256": sha256,
                              "unic_version": ckpt.get("unic_version")},
        "student": {
            "name": student["name"], "image_size": int(student["image_size"]),
            "patch_size": int(student.get("patch_size") or model.patch_embed.patch_size[0]),
            "embed_dim": int(model.num_features), "num_blocks": len(model.blocks),
            "num_register_tokens": int(getattr(model, "num_reg_tokens", 0)),
            "has_class_token": _num_summary_tokens(model) > 0,
            # model(x) / pooler_output: the summary token unic distilled
            "pooled_output": "class token" if _num_summary_tokens(model) > 0 else "mean patch token",
            "untrained_modules_dropped": dropped,
            "mean": [float(v) for v in student["mean"]], "std": [float(v) for v in student["std"]],
            "interpolation": student.get("interpolation", "bicubic"),
        },
        "teachers": [{"index": i, "spec": specs[i] if i < len(specs) else c["alias"], **c}
                     for i, c in enumerate(cards)],
        "license": _licence_summary(cards),
        "config": ckpt["config"],
        "last_metrics": ckpt.get("last_metrics"),
        "heads": {"file": HEADS_FILE, "teachers": [a for _, a in chosen]} if chosen else None,
    }
    probe = _read_probe_report(_run_dir_of(checkpoint) / "probe.json")

    # Write into a sibling temporary folder and move it into place only once verified: a failed export
    # never leaves a half-written folder, and --overwrite never loses the old one on failure.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        timm_config = _timm_config(student, encoder, model_args)
        (tmp / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
        if chosen:
            meta = _heads_meta(ckpt, chosen)
            save_file(_heads_state(ckpt, chosen), tmp / HEADS_FILE,
                      metadata={"format": "pt", "unic": json.dumps(meta)})
        info["verification"] = _verify(tmp, model, student, chosen)
        (tmp / "unic.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(info, probe, timm_config), encoding="utf-8")
        _share_like_a_new_folder(tmp)
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%s)", out_dir, ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return out_dir


@torch.no_grad()
def _verify(folder: Path, model: nn.Module, student: dict[str, Any], chosen: list[tuple[int, str]]
            ) -> dict[str, Any]:
    """Reload the written folder through timm and compare its tokens, and its pooled output `reloaded(x)`,
    with the checkpoint's encoder (the summary token: class token, or mean patch token)."""
    import timm

    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = int(student["image_size"])
    generator = torch.Generator().manual_seed(0)
    images_BCHW = torch.randn(2, 3, size, size, generator=generator)
    want_summary, want_patch = student_tokens(model, images_BCHW)
    got_summary, got_patch = student_tokens(reloaded, images_BCHW)
    pooled_diff = (reloaded(images_BCHW) - want_summary).abs().max().item()
    diff = max((want_summary - got_summary).abs().max().item(), (want_patch - got_patch).abs().max().item())
    if not max(diff, pooled_diff) <= VERIFY_ATOL:
        raise ExportVerificationError(f"the exported encoder does not reproduce the checkpoint: max abs difference "
                                      f"{diff:.3g} (tokens), {pooled_diff:.3g} (pooled output vs summary) > "
                                      f"{VERIFY_ATOL:g}; the folder was not written")
    result = {"max_abs_diff": diff, "pooled_max_abs_diff": pooled_diff, "atol": VERIFY_ATOL, "num_images": 2}
    if chosen:
        heads = _load_heads(folder, reloaded, student)
        for _, alias in chosen:
            out = heads[alias](images_BCHW)
            if not all(bool(torch.isfinite(t).all()) for t in out if t is not None):
                raise ExportVerificationError(f"kept head {alias!r} gives non-finite features; the folder was "
                                              "not written")
    log.info("verified: reloaded encoder matches the checkpoint (max abs diff %.3g)", diff)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Reading an export


@dataclass
class LoadedStudent:
    """An exported student, ready to use.

    Attributes:
        model: the timm encoder (eval mode, no classifier).
        transform: timm's eval transform for PIL images (resize, centre crop, to tensor, normalise).
        card: the folder's `unic.json` (teachers, licences, training config and step).
        heads: teacher alias -> `TeacherHead` for each kept teacher (empty without `heads.safetensors`).
    """

    model: nn.Module
    transform: Callable
    card: dict[str, Any]
    heads: dict[str, TeacherHead] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.card["student"]["image_size"])

    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] batches -> the encoder's input (resized, normalised); float input passes through."""
        s = self.card["student"]
        return _preprocess(images_BCHW, image_size=s["image_size"], mean=torch.tensor(s["mean"]),
                           std=torch.tensor(s["std"]), interpolation=s["interpolation"])

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summary_BD, patch_BND) of the last block for uint8 pixels or transform-normalised floats."""
        return student_tokens(self.model, self.preprocess(images_BCHW))


def _load_heads(folder: Path, model: nn.Module, s: dict[str, Any]) -> dict[str, TeacherHead]:
    path = folder / HEADS_FILE
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("unic", "{}"))
    if meta.get("format") != HEADS_FORMAT:
        raise ExportError(f"{str(path)!r} is not a unic heads file; re-export with --keep-heads")
    state = load_file(path)
    return {
        t["alias"]: TeacherHead(
            encoder=model, alias=t["alias"], card=t["card"], blocks=meta["blocks"], state=state, key=t["key"],
            shared=meta["shared_heads"], standardize=meta["standardize"], eps=meta["std_eps"],
            image_size=int(s["image_size"]), mean=s["mean"], std=s["std"],
            interpolation=s.get("interpolation", "bicubic")).eval()
        for t in meta["teachers"]
    }


def load_student(folder: str | Path, *, device: str | torch.device = "cpu") -> LoadedStudent:
    """Load an exported student: encoder, transform, provenance and any kept teacher heads.

    Example:
        >>> student = load_student("students/a")
        >>> summary_BD, patch_BND = student.encode(images_uint8_BCHW)
        >>> clip_summary_BD = student.heads["metaclip_h"](images_uint8_BCHW).summary_BD
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    folder = Path(folder).expanduser()
    if not (folder / "unic.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ExportError(f"{str(folder)!r} is not an exported unic student (needs unic.json and {WEIGHTS_FILE}); "
                          "create one with `unic export RUN --out DIR`")
    try:
        card = json.loads((folder / "unic.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{str(folder / 'unic.json')!r} is unreadable ({err}); re-export this student") from None
    if (not isinstance(card, dict) or card.get("format") != EXPORT_FORMAT
            or card.get("format_version", 0) > FORMAT_VERSION):
        found = (f"format {card.get('format')!r} v{card.get('format_version')}" if isinstance(card, dict)
                 else "not a JSON object")
        raise ExportError(f"{str(folder / 'unic.json')!r} is not a unic export this version reads "
                          f"({found}); re-export or upgrade unic")
    # a damaged or foreign weights file (a pickle renamed model.safetensors) is a clear error, never unpickled
    from safetensors import SafetensorError

    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval().to(device)
        heads = _load_heads(folder, model, card["student"]) if (folder / HEADS_FILE).is_file() else {}
    except SafetensorError as err:
        raise ExportError(f"{str(folder)!r} holds a weights file that is not readable safetensors ({err}); "
                          "re-export this student") from None
    transform = create_transform(**resolve_data_config({}, model=model))
    return LoadedStudent(model=model, transform=transform, card=card,
                         heads={a: h.to(device) for a, h in heads.items()})

