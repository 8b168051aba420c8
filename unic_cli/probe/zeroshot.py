"""Zero-shot classification in a CLIP teacher's joint space: class names -> prompts -> text tower -> top-1/top-5.

Shape legend: B batch, M test images, D summary width, E joint-space width, C classes, P prompt templates.

A CLIP-like teacher (an open_clip backbone exposing `encode_text` and `summary_to_embedding`) classifies with
its own summary token. A student exported with such a teacher's head (`unic export --keep-heads ALIAS`) maps its
images into that teacher's summary space with the head, then through the teacher's own projection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from unic_cli.errors import ProbeError

log = logging.getLogger("unic_cli")

# CLIP's "a photo of a {}." plus a few of its ImageNet prompt-ensemble templates (Radford et al. 2021).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "art of the {}.",
)


@dataclass
class ClipSpace:
    """A CLIP teacher's joint space.

    Attributes:
        teacher: the teacher's alias or spec.
        encode_text: list of texts -> [B, E] L2-normalised text embeddings.
        summary_to_embedding: the teacher's summary tokens [B, D] -> [B, E] L2-normalised image embeddings.
    """

    teacher: str
    encode_text: Callable[[list[str]], torch.Tensor]
    summary_to_embedding: Callable[[torch.Tensor], torch.Tensor]


def is_clip_backbone(backbone: object) -> bool:
    return hasattr(backbone, "encode_text") and hasattr(backbone, "summary_to_embedding")


def clip_space_of(teacher_module: torch.nn.Module, name: str) -> ClipSpace:
    """The joint space of a loaded teacher (`unic_cli.teachers.Teacher`), or a ProbeError naming the fix."""
    backbone = teacher_module.backbone
    if not is_clip_backbone(backbone):
        raise ProbeError(f"{name!r} has no CLIP text tower, so --task zeroshot cannot classify with it; use a "
                         "CLIP teacher (an open_clip alias or open_clip:ARCH spec), or a student exported with "
                         "`unic export --keep-heads CLIP_ALIAS`")
    return ClipSpace(name, backbone.encode_text, backbone.summary_to_embedding)


def class_prompt_names(classes: Sequence[str]) -> list[str]:
    """Folder names as words: `golden_retriever` -> `golden retriever`."""
    return [c.replace("_", " ").replace("-", " ").strip() for c in classes]


def warn_about_class_names(classes: Sequence[str]) -> None:
    """Log a warning when folder names cannot work as prompts: WordNet ids (ImageNet's `n01440764` folders)
    mean nothing to a text tower, and two folders that give the same words get the same text embedding."""
    wnids = [c for c in classes if re.fullmatch(r"n\d{8}", c)]
    if wnids:
        log.warning("zero-shot prompts use the class folder names, and %d of %d look like WordNet ids (%s): the "
                    "text tower reads them as meaningless tokens and the score is near chance; rename the folders "
                    "to class names (e.g. n01440764 -> tench)", len(wnids), len(classes), ", ".join(wnids[:3]))
    names = class_prompt_names(classes)
    if clashes := sorted({n for n in names if names.count(n) > 1}):
        log.warning("zero-shot: class folders %s read as the same words, so their prompts cannot tell them apart",
                    [c for c, n in zip(classes, names) if n in clashes])


@torch.no_grad()
def text_classifier(space: ClipSpace, classes: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """[C, E]: per class, the renormalised mean of its prompts' text embeddings (CLIP's prompt ensemble)."""
    names = class_prompt_names(classes)
    texts = [t.format(name) for name in names for t in templates]
    text_CPE = space.encode_text(texts).float().unflatten(0, (len(names), len(templates)))
    return torch.nn.functional.normalize(text_CPE.mean(dim=1), dim=-1)


@torch.no_grad()
def run_zeroshot_probe(
    summary_MD: torch.Tensor,
    labels_M: torch.Tensor,
    *,
    space: ClipSpace,
    classes: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) of cosine similarity to the class text embeddings.

    No logit scale is applied: CLIP's scale multiplies every similarity by one positive number, which leaves
    the ranking (top-1, top-5) unchanged.
    """
    warn_about_class_names(classes)
    text_CE = text_classifier(space, classes, templates)
    labels_M = labels_M.to(text_CE.device)
    k = min(5, len(classes))
    hits1 = hits5 = 0
    for start in range(0, summary_MD.shape[0], batch_size):
        chunk_BD = summary_MD[start : start + batch_size].to(text_CE.device)
        image_BE = space.summary_to_embedding(chunk_BD).float()
        ranked_BK = (image_BE @ text_CE.T).topk(k, dim=1).indices
        hit_BK = ranked_BK == labels_M[start : start + batch_size, None]
        hits1 = hits1 + hit_BK[:, 0].sum()
        hits5 = hits5 + hit_BK.any(dim=1).sum()
    total = summary_MD.shape[0]
    metrics = {"top1": float(hits1) / total}
    if len(classes) > 5:
        metrics["top5"] = float(hits5) / total
    return metrics
