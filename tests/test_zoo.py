"""unic_cli.zoo: the CIFAR ResNet as a user's own teacher, with the real released weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unic_cli.registry import get_card
from unic_cli.teachers import load_teacher, resolve_card
from unic_cli.zoo.cifar_resnet import CifarResNet, resnet20, resnet56

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_test(root, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / "cifar10" / "test" / name).iterdir())[:per_class]:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@pytest.mark.parametrize(("build", "num_params"), [(resnet20, 269_722), (resnet56, 853_018)])
def test_cifar_resnet__parameter_count_matches_the_paper(build, num_params) -> None:
    assert sum(p.numel() for p in build().parameters()) == num_params  # He et al.: 0.27 M and 0.85 M


def test_cifar_resnet__rejects_a_depth_that_is_not_6n_plus_2() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_cifar_resnet__tokens_follow_the_card_at_any_grid() -> None:
    torch.manual_seed(0)
    card = get_card("cifar_resnet56")
    assert card.source == "py" and card.native_grid == (8, 8)
    assert resolve_card("py:unic_cli.zoo.cifar_resnet:resnet56").to_dict() | {"alias": "", "model_id": "",
                                                                            "notes": ""} == card.to_dict() | {
        "alias": "", "model_id": "", "notes": ""}
    teacher = load_teacher("cifar_resnet20", grid=(4, 4), pretrained=False)
    tokens = teacher(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8))
    assert teacher.input_size == (32, 32)
    assert tokens.summary_BD.shape == (2, 64) and tokens.patch_BND.shape == (2, 16, 64)


def _top1(shared_data, per_class: int) -> float:
    weights = next((shared_data / "cifar_resnet").glob("resnet56-*.th"))
    teacher = load_teacher(f"cifar_resnet56={weights}", pretrained=True)
    images_BCHW, labels_B = _cifar_test(shared_data, per_class=per_class)
    with torch.no_grad():
        logits_BK = teacher.backbone.module.classify(teacher.preprocess(images_BCHW))
        tokens = teacher(images_BCHW)
    # the summary token is the pooled feature the original head reads
    torch.testing.assert_close(teacher.backbone.module.linear(tokens.summary_BD), logits_BK)
    assert tokens.patch_BND.shape == (len(labels_B), 64, 64)
    return (logits_BK.argmax(1) == labels_B).float().mean().item()


def test_cifar_resnet56__real_weights_classify_cifar10(shared_data) -> None:
    accuracy = _top1(shared_data, per_class=20)  # 200 images: a few seconds, standard error about 0.03
    assert accuracy > 0.74, f"top-1 {accuracy:.3f}; about 0.83 expected on this JPEG copy"


@pytest.mark.slow
def test_cifar_resnet56__real_weights_reach_the_measured_top1(shared_data) -> None:
    accuracy = _top1(shared_data, per_class=200)  # the whole 2000-image test split
    assert 0.80 < accuracy < 0.87, f"top-1 {accuracy:.3f}; 0.83 measured on this JPEG copy"
