"""TimmTeacher: forward_intermediates on the last block, prefix (cls + registers) split off."""

from __future__ import annotations

import torch
from torch import nn

from unic_cli.errors import RegistryError
from unic_cli.registry import TeacherCard, TeacherSpec


class TimmTeacher(nn.Module):
    """A timm ViT or ConvNet as a Backbone."""

    def __init__(self, card: TeacherCard, *, pretrained: bool) -> None:
        super().__init__()
        import timm

        name = f"{card.model_id}.{card.pretrained_tag}" if card.pretrained_tag else card.model_id
        kwargs = {"img_size": card.image_size} if card.family == "vit" else {}
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        if card.family == "vit" and getattr(model, "num_reg_tokens", 0) != card.num_register_tokens:
            raise RegistryError(
                f"{card.alias}: card says {card.num_register_tokens} register tokens, {name} has "
                f"{model.num_reg_tokens}; fix the card"
            )
        self.card, self.model = card, model

    def forward_tokens(self, images_BCHW: torch.Tensor):
        if self.card.family == "convnet":
            fmap_BDhw = self.model.forward_features(images_BCHW)
            summary_BD = self.model.forward_head(fmap_BDhw, pre_logits=True)
            return summary_BD, fmap_BDhw.flatten(2).transpose(1, 2), tuple(fmap_BDhw.shape[-2:])
        (patch_BDhw, prefix_BPD), = self.model.forward_intermediates(
            images_BCHW, indices=1, norm=True, return_prefix_tokens=True, output_fmt="NCHW", intermediates_only=True
        )
        summary_BD = prefix_BPD[:, 0] if self.card.summary_from == "cls" and prefix_BPD.shape[1] else None
        return summary_BD, patch_BDhw.flatten(2).transpose(1, 2), tuple(patch_BDhw.shape[-2:])


def build_backbone(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    return TimmTeacher(card, pretrained=pretrained and spec.weights is None)


def card_from_spec(spec: TeacherSpec) -> TeacherCard:
    raise NotImplementedError("timm: explicit specs are not implemented yet")
