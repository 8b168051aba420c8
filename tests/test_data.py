"""Image folders: listing, robust decoding, the UNIC augmentation, exact resume, rank sharding, eval loader."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from unic_cli.data import (
    Batch,
    augment_unic,
    build_eval_loader,
    build_train_loader,
    decode_image,
    list_image_folder,
    load_crop,
)
from unic_cli.errors import DataError

SIZE = 32  # output side for every loader test: keeps decode + augment to well under a millisecond


def _solid(value: int, size=(40, 30)) -> Image.Image:
    """An RGB image whose red channel names it: survives resize + center crop unchanged."""
    return Image.new("RGB", size, (value, 100, 200))


def _write_folder(root, num_images: int, *, classes=("a", "b"), noise: bool = False):
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        if noise:
            img = Image.fromarray(rng.integers(0, 256, (36 + i % 5, 44, 3), dtype=np.uint8))
        else:
            img = _solid(5 * i + 3)
        img.save(folder / f"img{i:03d}.png")
    return root


def _ids(batch: Batch) -> list[int]:
    return batch.images_BCHW[:, 0, 0, 0].tolist()


def _take(loader, num_batches: int) -> list[Batch]:
    it = iter(loader)
    return [next(it) for _ in range(num_batches)]


# --- listing and errors -----------------------------------------------------------------------


def test_list_image_folder__recursive_sorted_case_insensitive_with_classes(tmp_path) -> None:
    for rel in ["b/x/2.JPG", "b/1.png", "a/3.TIFF", "top.Webp", ".hidden/4.jpg", "a/._5.jpg", "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    entries = list_image_folder(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p, _ in entries] == ["a/3.TIFF", "b/1.png", "b/x/2.JPG",
                                                                        "top.Webp"]
    assert [c for _, c in entries] == ["a", "b", "b", ""]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.jpg").write_bytes(b"x") and p / "f.jpg", "is a file, not a folder"),
    (lambda p: (p / "notes.txt").write_text("x") and p, "No images found"),
])
def test_build_train_loader__data_errors(tmp_path, make, message) -> None:
    with pytest.raises(DataError, match=message) as info:
        build_train_loader(make(tmp_path), image_size=SIZE, batch_size=2, num_workers=0, seed=0)
    assert info.value.exit_code == 2
    if message == "No images found":
        assert ".jpg" in str(info.value) and ".webp" in str(info.value)


def test_build_train_loader__rejects_batch_larger_than_dataset_and_bad_augment(tmp_path) -> None:
    _write_folder(tmp_path, 3)
    with pytest.raises(DataError, match="fewer than one global batch of 4"):
        build_train_loader(tmp_path, image_size=SIZE, batch_size=2, world_size=2, num_workers=0, seed=0)
    # an optimiser step of 2 x 2 accumulated images needs 4 (an epoch of none would never end)
    with pytest.raises(DataError, match=r"fewer than one global batch of 4 \(2 per process x 1 processes x 2 acc"):
        build_train_loader(tmp_path, image_size=SIZE, batch_size=2, accum_steps=2, num_workers=0, seed=0)
    with pytest.raises(DataError, match="Unknown augmentation 'dino'"):
        build_train_loader(tmp_path, image_size=SIZE, batch_size=2, num_workers=0, seed=0, augment="dino")


# --- decoding ----------------------------------------------------------------------------------


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_decode_image__converts_odd_modes_to_rgb(tmp_path) -> None:
    gray16 = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    cases = {
        "cmyk.jpg": _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"),
        "gray16.png": _save(Image.fromarray(gray16), tmp_path / "gray16.png"),
        "gray.png": _save(Image.new("L", (4, 4), 77), tmp_path / "gray.png"),
        "la.png": _save(Image.new("LA", (4, 4), (77, 0)), tmp_path / "la.png"),
        "palette.gif": _save(palette, tmp_path / "palette.gif"),
        "rgba.png": _save(rgba, tmp_path / "rgba.png"),
        "bilevel.bmp": _save(Image.new("1", (4, 4), 1), tmp_path / "bilevel.bmp"),
    }
    out = {name: np.asarray(decode_image(path)) for name, path in cases.items()}
    for name, arr in out.items():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
    assert out["cmyk.jpg"][0, 0, 0] > 200 and out["cmyk.jpg"][0, 0, 1] < 60  # CMYK (0,255,255,0) is red
    assert out["gray16.png"][0].tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255]]  # scaled, not clipped
    assert out["gray.png"][0, 0].tolist() == [77, 77, 77]
    assert out["la.png"][0, 0].tolist() == [255, 255, 255]  # fully transparent: white
    assert out["palette.gif"][0, 0].tolist() == [250, 10, 10]
    assert out["rgba.png"][0, 0].tolist() == [10, 20, 30] and out["rgba.png"][1, 1].tolist() == [255, 255, 255]
    assert out["bilevel.bmp"][0, 0].tolist() == [255, 255, 255]


def test_decode_image__applies_exif_orientation(tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.new("RGB", (40, 20), (0, 0, 0)), tmp_path / "rot.jpg", exif=exif)
    assert decode_image(path).size == (20, 40)


@pytest.mark.parametrize("orientation", [1, 6])
def test_load_crop__reduced_jpeg_decode_matches_full_decode(tmp_path, orientation) -> None:
    yy, xx = np.mgrid[0:600, 0:1000]
    smooth = np.stack([xx * 255 // 999, yy * 255 // 599, (xx + yy) * 255 // 1598], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(smooth), tmp_path / "big.jpg", quality=95, exif=exif)
    box = (100, 50, 500, 450)  # 400 px wide for a 32 px output: decoded at 1/8 scale
    fast = np.asarray(load_crop(path, SIZE, lambda w, h: box), dtype=np.float64)
    full = np.asarray(decode_image(path).resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box), dtype=np.float64)
    assert np.abs(fast - full).mean() < 2.0


def _write_corrupt_files(folder) -> int:
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "random.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    return 3


def test_train_loader__skips_and_counts_unreadable_files(tmp_path, caplog) -> None:
    _write_folder(tmp_path, 5, classes=())
    _write_corrupt_files(tmp_path)
    loader = build_train_loader(tmp_path, image_size=SIZE, batch_size=4, num_workers=0, seed=0, augment="none")
    assert loader.num_images == 8 and loader.steps_per_epoch == 2
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        batches = _take(loader, 4)  # two epochs
    assert sum(len(b.images_BCHW) for b in batches[:2]) == 5 and sum(b.num_skipped for b in batches[:2]) == 3
    assert sum(b.num_skipped for b in batches) == 6 and loader.num_skipped_total == 6
    assert all(len(b.images_BCHW) + b.num_skipped == 4 for b in batches)
    warned = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert len(warned) == 3  # once per file, not once per epoch
    assert any("truncated.jpg" in m and "image file is truncated" in m for m in warned)


def test_train_loader__all_unreadable_raises(tmp_path) -> None:
    _write_corrupt_files(tmp_path)
    loader = build_train_loader(tmp_path, image_size=SIZE, batch_size=1, num_workers=0, seed=0)
    with pytest.raises(DataError, match="No readable image"):
        next(iter(loader))


# --- the training stream -------------------------------------------------------------------------


def test_train_loader__epochs_cover_every_image_then_reshuffle(tmp_path) -> None:
    _write_folder(tmp_path, 12)
    loader = build_train_loader(tmp_path, image_size=SIZE, batch_size=4, num_workers=0, seed=3, augment="none")
    batches = _take(loader, 7)
    epoch0 = [i for b in batches[:3] for i in _ids(b)]
    epoch1 = [i for b in batches[3:6] for i in _ids(b)]
    assert sorted(epoch0) == sorted(epoch1) == [5 * i + 3 for i in range(12)]
    assert epoch0 != epoch1
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch_index"] == 1
    assert all(b.images_BCHW.dtype == torch.uint8 and b.images_BCHW.shape == (4, 3, SIZE, SIZE) for b in batches)


def test_train_loader__resume_gives_identical_batches(tmp_path) -> None:
    _write_folder(tmp_path, 10, noise=True)
    kwargs = dict(image_size=SIZE, batch_size=3, num_workers=0, seed=7)  # 3 steps/epoch, 1 image dropped
    straight = _take(build_train_loader(tmp_path, **kwargs), 8)
    first = build_train_loader(tmp_path, **kwargs)
    _take(first, 2)
    state = first.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = build_train_loader(tmp_path, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(straight[2:], _take(resumed, 6)):  # crosses two epoch boundaries
        assert torch.equal(a.images_BCHW, b.images_BCHW)


def test_train_loader__ranks_split_each_global_batch(tmp_path) -> None:
    _write_folder(tmp_path, 13, noise=True)
    kwargs = dict(image_size=SIZE, num_workers=0, seed=1)
    single = _take(build_train_loader(tmp_path, batch_size=4, **kwargs), 4)
    ranks = [_take(build_train_loader(tmp_path, batch_size=2, rank=r, world_size=2, **kwargs), 4) for r in (0, 1)]
    for step in range(4):  # same images and the same crops: augmentation is seeded per image, not per rank
        assert torch.equal(torch.cat([ranks[0][step].images_BCHW, ranks[1][step].images_BCHW]),
                           single[step].images_BCHW)


def test_train_loader__ranks_are_disjoint_and_cover_the_epoch(tmp_path) -> None:
    _write_folder(tmp_path, 12)
    seen = []
    for rank in range(3):
        loader = build_train_loader(tmp_path, image_size=SIZE, batch_size=2, num_workers=0, seed=0, rank=rank,
                                    world_size=3, augment="none")
        assert loader.steps_per_epoch == 2
        seen.append([i for b in _take(loader, 2) for i in _ids(b)])
    assert sorted(sum(seen, [])) == [5 * i + 3 for i in range(12)]


def test_train_loader__resume_onto_other_world_size(tmp_path) -> None:
    _write_folder(tmp_path, 16, noise=True)
    kwargs = dict(image_size=SIZE, num_workers=0, seed=2)
    two = [build_train_loader(tmp_path, batch_size=2, rank=r, world_size=2, **kwargs) for r in (0, 1)]
    for loader in two:
        _take(loader, 3)
    one = build_train_loader(tmp_path, batch_size=4, **kwargs)
    one.load_state_dict(two[0].state_dict())
    expected = _take(build_train_loader(tmp_path, batch_size=4, **kwargs), 4)[3]
    assert torch.equal(next(iter(one)).images_BCHW, expected.images_BCHW)


def test_train_loader__workers_match_in_process_decoding(tmp_path) -> None:
    _write_folder(tmp_path, 12, noise=True)
    kwargs = dict(image_size=SIZE, batch_size=4, seed=5)
    in_process = _take(build_train_loader(tmp_path, num_workers=0, **kwargs), 5)
    workers = _take(build_train_loader(tmp_path, num_workers=2, **kwargs), 5)
    for a, b in zip(in_process, workers):
        assert torch.equal(a.images_BCHW, b.images_BCHW)


def test_augment_unic__seeded_uint8_and_varied() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    a = augment_unic(img, SIZE, np.random.default_rng(4))
    assert a.dtype == torch.uint8 and a.shape == (3, SIZE, SIZE)
    assert torch.equal(a, augment_unic(img, SIZE, np.random.default_rng(4)))
    views = [augment_unic(img, SIZE, np.random.default_rng(s)) for s in range(8)]
    assert len({v.float().mean().item() for v in views}) == 8


def _colour_test_image() -> torch.Tensor:
    """Noise plus the awkward pixels of an RGB -> HSV round trip: grays, black, white, pure and tied hues."""
    image_CHW = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 48), dtype=np.uint8))
    image_CHW[:, :4] = image_CHW[:1, :4]
    image_CHW[:, 4, :24], image_CHW[:, 4, 24:] = 0, 255
    for row, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 3), (3, 200, 200), (200, 3, 200)]):
        image_CHW[:, 5 + row] = torch.tensor(rgb, dtype=torch.uint8)[:, None]
    return image_CHW


def test_colour_jitter__matches_torchvision_bit_for_bit() -> None:
    from torchvision.transforms.v2 import functional as TF

    from unic_cli.data.image import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation

    image_CHW = _colour_test_image()
    rng = np.random.default_rng(1)
    hues = [0.0, 0.5, -0.5, 1e-9, -1e-9, 1 / 6, -1 / 3] + list(rng.uniform(-0.5, 0.5, 30))
    for hue in hues:
        assert torch.equal(adjust_hue(image_CHW, float(hue)), TF.adjust_hue(image_CHW, float(hue))), hue
    for factor in rng.uniform(0.6, 1.4, 10):
        for ours, theirs in [(adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
                             (adjust_saturation, TF.adjust_saturation)]:
            assert torch.equal(ours(image_CHW, float(factor)), theirs(image_CHW, float(factor))), (ours, factor)


def test_gaussian_blur__matches_torchvision_within_one_level() -> None:
    from torchvision.transforms.v2 import functional as TF

    from unic_cli.data.image import gaussian_blur

    image_CHW = _colour_test_image()
    for sigma in [0.1, 0.7, 2.0, 5.0]:
        diff = gaussian_blur(image_CHW, sigma).int() - TF.gaussian_blur(image_CHW, [9, 9], [sigma, sigma]).int()
        assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3


def test_augment_unic__same_draws_and_pixels_as_the_torchvision_recipe() -> None:
    """The recipe written with torchvision's ops (as naver/unic does): identical except blur's rounding."""
    from torchvision.transforms.v2 import functional as TF

    from unic_cli.data.image import random_resized_crop_box, to_tensor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for seed in range(24):
        rng = np.random.default_rng(seed)
        box = random_resized_crop_box(img.width, img.height, rng)
        view = img.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        expected = to_tensor(view)
        if rng.random() < 0.8:
            factors = (rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1))
            for op in rng.permutation(4):
                expected = ops[op](expected, float(factors[op]))
        if rng.random() < 0.2:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        blurred = rng.random() < 0.2
        if blurred:
            sigma = float(rng.uniform(0.1, 5.0))
            expected = TF.gaussian_blur(expected, kernel_size=[9, 9], sigma=[sigma, sigma])
        if rng.random() < 0.2:
            expected = torch.where(expected >= 128, 255 - expected, expected)
        got = augment_unic(img, SIZE, np.random.default_rng(seed))
        assert (got.int() - expected.int()).abs().max() <= (1 if blurred else 0), seed


def test_random_resized_crop_box__pinned_regions_for_a_seed() -> None:
    """The crop region is part of the recipe (and of exact resume): a change here must be deliberate."""
    from unic_cli.data.image import random_resized_crop_box

    boxes = [random_resized_crop_box(500, 375, np.random.default_rng(seed)) for seed in range(3)]
    assert boxes == [(302, 35, 431, 206), (19, 3, 385, 285), (219, 48, 450, 308)]


def _frame(side: int = 96) -> Image.Image:
    """White square inside a black frame a quarter of the side wide: corners dark, centre bright."""
    pixels = np.zeros((side, side, 3), dtype=np.uint8)
    pixels[side // 4: -side // 4, side // 4: -side // 4] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("crop_scale", "least", "most"), [((1.0, 1.0), 0.6, 1.0), ((0.08, 0.08), 0.0, 0.0)])
def test_train_loader__crop_scale_sets_the_crop_area(tmp_path, crop_scale, least, most) -> None:
    for i in range(32):
        _frame().save(tmp_path / f"{i}.png")
    batch = _take(build_train_loader(tmp_path, image_size=32, batch_size=32, num_workers=0, seed=3,
                                     crop_scale=crop_scale), 1)[0]
    gray = batch.images_BCHW.float().mean(dim=1)  # B, H, W
    corners = torch.stack([gray[:, 0, 0], gray[:, 0, -1], gray[:, -1, 0], gray[:, -1, -1]], dim=1)
    centre = gray[:, 14:18, 14:18].mean(dim=(1, 2))
    # a view of the whole image has four alike corners (the frame) unlike its centre, unless colour jitter,
    # blur or solarisation flattened it; a 0.08 crop (at most a third of the side) never spans the frame
    whole = (corners.amax(dim=1) - corners.amin(dim=1) < 30) & ((corners.mean(dim=1) - centre).abs() > 60)
    assert least <= whole.float().mean().item() <= most


def test_build_train_loader__rejects_a_bad_crop_scale(tmp_path) -> None:
    _write_folder(tmp_path, 4)
    for bad in ((0.5, 0.2), (0.0, 1.0), (0.3, 1.5), (0.5,)):
        with pytest.raises(DataError, match="crop scale must be two fractions"):
            build_train_loader(tmp_path, image_size=SIZE, batch_size=2, num_workers=0, seed=0, crop_scale=bad)


# --- evaluation loader ---------------------------------------------------------------------------


def test_build_eval_loader__labels_and_indices_survive_a_skipped_file(tmp_path) -> None:
    _write_folder(tmp_path, 6)
    (tmp_path / "b" / "broken.jpg").write_bytes(b"")
    loader = build_eval_loader(tmp_path, image_size=SIZE, batch_size=4)
    assert loader.class_names == ["a", "b"] and len(loader.paths) == 7
    batches = list(loader)
    index = torch.cat([b.index_B for b in batches])
    labels = torch.cat([b.label_B for b in batches])
    assert sum(b.num_skipped for b in batches) == 1 and len(index) == 6
    assert [loader.paths[i].rsplit("/", 2)[-2] for i in index] == [["a", "b"][y] for y in labels]
    flat = build_eval_loader([tmp_path / "a" / "img000.png"], image_size=SIZE, batch_size=4)
    assert next(iter(flat)).label_B.tolist() == [-1]


# --- real data -----------------------------------------------------------------------------------


def test_hymenoptera__placeholder_gif_and_jpeg_extension_decode(shared_data) -> None:
    ants = shared_data / "hymenoptera" / "train" / "ants"
    names = [p.name for p, _ in list_image_folder(ants)]
    assert "imageNotFound.gif" in names and "formica.jpeg" in names
    loader = build_eval_loader([ants / "imageNotFound.gif", ants / "formica.jpeg"], image_size=64, batch_size=2)
    batch = next(iter(loader))
    assert batch.images_BCHW.shape == (2, 3, 64, 64) and batch.num_skipped == 0
    train = build_train_loader(shared_data / "hymenoptera" / "train", image_size=64, batch_size=8, num_workers=0,
                               seed=0)
    assert train.num_images == 245 and train.steps_per_epoch == 30
    batch = next(iter(train))
    assert batch.images_BCHW.shape == (8, 3, 64, 64) and batch.num_skipped == 0


# --- WebDataset tar shards -----------------------------------------------------------------------


def _write_shards(folder, shard_dir, num_shards: int):
    """Pack `folder`'s images, in listing order, into WebDataset shards with a label member per sample."""
    import tarfile

    entries = list_image_folder(folder)
    shard_dir.mkdir()
    per_shard = -(-len(entries) // num_shards)
    for s in range(num_shards):
        with tarfile.open(shard_dir / f"train-{s:03d}.tar", "w") as tar:
            for i, (path, cls) in enumerate(entries[s * per_shard:(s + 1) * per_shard]):
                key = f"{s:03d}{i:04d}"
                tar.add(path, arcname=f"{key}.{path.suffix[1:]}")
                label = tmp = shard_dir / "label.cls"
                label.write_text(cls)
                tar.add(tmp, arcname=f"{key}.cls")
                tmp.unlink()
    return shard_dir


def test_tar_shards__same_stream_as_the_folder(tmp_path) -> None:
    _write_folder(tmp_path / "imgs", 10, noise=True)
    shards = _write_shards(tmp_path / "imgs", tmp_path / "shards", 3)
    kwargs = dict(image_size=SIZE, batch_size=3, num_workers=0, seed=4)
    expected = _take(build_train_loader(tmp_path / "imgs", **kwargs), 4)
    for source in (shards, str(shards / "train-{000..002}.tar")):
        loader = build_train_loader(source, **kwargs)
        assert loader.num_images == 10
        for a, b in zip(expected, _take(loader, 4)):
            assert torch.equal(a.images_BCHW, b.images_BCHW)


def test_tar_shards__corrupt_member_skipped_and_damaged_shard_partly_used(tmp_path, caplog) -> None:
    import tarfile

    _write_folder(tmp_path / "imgs", 6, noise=True)
    shards = _write_shards(tmp_path / "imgs", tmp_path / "shards", 2)
    (tmp_path / "bad.jpg").write_bytes(b"")
    with tarfile.open(shards / "train-002.tar", "w") as tar:
        tar.add(tmp_path / "bad.jpg", arcname="k0.jpg")
    damaged = (shards / "train-001.tar").read_bytes()
    (shards / "train-001.tar").write_bytes(damaged[:2600])  # inside the first member's data
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        loader = build_train_loader(shards, image_size=SIZE, batch_size=2, num_workers=0, seed=0)
        batches = _take(loader, loader.steps_per_epoch)
    assert any("train-001.tar is unreadable (ReadError: unexpected end of data); skipping it" in r.getMessage()
               for r in caplog.records)
    assert loader.num_images == 4  # shard 0's three, and k0.jpg; the cut member is not indexed
    assert sum(b.num_skipped for b in batches) == 1  # k0.jpg
    assert any("train-002.tar:k0.jpg" in r.getMessage() for r in caplog.records)


def _one_shard(tmp_path, num_samples: int = 6):
    """One shard of `num_samples` (.png, .cls) samples written by Python's tarfile, its members and images."""
    import tarfile

    _write_folder(tmp_path / "imgs", num_samples, noise=True)
    shard = _write_shards(tmp_path / "imgs", tmp_path / "shards", 1) / "train-000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    return shard, members, [p for p, _ in list_image_folder(tmp_path / "imgs")]


def _cut(shard, size: int) -> None:
    with open(shard, "r+b") as f:
        f.truncate(size)


# (where the shard is cut, samples kept): members alternate 000000k.png, 000000k.cls
_CUTS = {
    "at the header of sample 3": (lambda m: m[6].offset, 3),
    "inside the header of sample 3": (lambda m: m[6].offset + 100, 3),
    "inside the image data of sample 3": (lambda m: m[6].offset_data + 10, 3),  # the cut image is not kept
    "inside the label header of sample 3": (lambda m: m[7].offset + 100, 4),  # its image is whole
    "before the end-of-archive marker": (lambda m: m[-1].offset_data + 512, 6),
    "inside the end-of-archive marker": (lambda m: m[-1].offset_data + 512 + 100, 6),
}


@pytest.mark.parametrize("where", list(_CUTS))
def test_tar_index__cut_shard_warns_with_the_samples_kept(tmp_path, caplog, where) -> None:
    from unic_cli.data import open_image_source

    shard, members, images = _one_shard(tmp_path)
    offset, kept = _CUTS[where]
    _cut(shard, offset(members))
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        source = open_image_source(shard)
    assert len(source) == kept
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"{shard} is unreadable after {kept} samples" in warnings[0], warnings
    assert [source.open(i).read() for i in range(kept)] == [p.read_bytes() for p in images[:kept]]


def test_tar_index__invalid_header_warns(tmp_path, caplog) -> None:
    from unic_cli.data import open_image_source

    shard, members, _ = _one_shard(tmp_path)
    data = bytearray(shard.read_bytes())
    data[members[4].offset:members[4].offset + 512] = b"x" * 512  # sample 2's header, not a tar header
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        assert len(open_image_source(shard)) == 2
    assert any(f"after 2 samples (invalid tar header at byte {members[4].offset})" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("where", ["empty", "inside the first header", "inside the first image"])
def test_tar_index__no_readable_sample_is_a_data_error(tmp_path, caplog, where) -> None:
    from unic_cli.data import open_image_source

    shard, members, _ = _one_shard(tmp_path)
    _cut(shard, {"empty": 0, "inside the first header": 100}.get(where, members[0].offset_data + 10))
    with pytest.raises(DataError, match=f"No readable sample in the tar shard.*: {shard} is damaged \\(") as info:
        open_image_source(shard)
    # the error says it all: no warning besides it (other tests may leave INFO logging on)
    assert info.value.exit_code == 2 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _write_with(writer: str, shard, images) -> None:
    """A well-formed shard of `images` (and a label each) from one tar writer; long names need extension headers."""
    import tarfile

    long_dir = "d" * 120 + "/"  # past ustar's 100-character name field
    if writer == "gnu tar":
        import shutil
        import subprocess

        if shutil.which("tar") is None:
            pytest.skip("no tar executable")
        staged = shard.parent / "staged"
        for i, path in enumerate(images):
            (staged / long_dir).mkdir(parents=True, exist_ok=True)
            (staged / long_dir / f"{i:04d}.png").write_bytes(path.read_bytes())
            (staged / long_dir / f"{i:04d}.cls").write_text("0")
        subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(staged), long_dir], check=True)
    elif writer == "webdataset":
        wds = pytest.importorskip("webdataset")
        with wds.TarWriter(str(shard)) as sink:
            for i, path in enumerate(images):
                sink.write({"__key__": f"{long_dir}{i:04d}", "png": path.read_bytes(), "cls": 0})
    else:
        fmt = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[writer]
        with tarfile.open(shard, "w", format=fmt) as tar:
            for i, path in enumerate(images):
                prefix = "" if writer == "ustar" else long_dir
                tar.add(path, arcname=f"{prefix}{i:04d}.png")
                tar.add(path, arcname=f"{prefix}{i:04d}.cls")


@pytest.mark.parametrize("writer", ["ustar", "gnu", "pax", "gnu tar", "webdataset"])
def test_tar_index__well_formed_shards_do_not_warn(tmp_path, caplog, writer) -> None:
    from unic_cli.data import open_image_source

    images = [p for p, _ in list_image_folder(_write_folder(tmp_path / "imgs", 5, classes=(), noise=True))]
    shard = tmp_path / "train-000.tar"
    _write_with(writer, shard, images)
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        source = open_image_source(shard)
        assert len(source) == 5
        _cut(shard, shard.stat().st_size // 10240 * 10240 - 1)  # one byte of record padding: still complete
        assert len(open_image_source(shard)) == 5
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert [source.open(i).read() for i in range(5)] == [p.read_bytes() for p in images]


def test_tar_shards__missing_pattern_member_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match="2 of the 2 shards"):
        build_train_loader(str(tmp_path / "s-{0..1}.tar"), image_size=SIZE, batch_size=1, num_workers=0, seed=0)


def test_train_loader__leaves_the_global_rng_untouched(tiny_images):
    from unic_cli.data import build_train_loader

    loader = build_train_loader(tiny_images, image_size=32, batch_size=4, num_workers=0, seed=0, augment="none")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_train_loader__an_unreadable_batch_keeps_the_ranks_in_step(tmp_path) -> None:
    # batch size 1 per rank: the rank that draws the broken file has nothing to train on in that step
    _write_folder(tmp_path, 3, classes=())
    (tmp_path / "zz_broken.png").write_bytes(b"not an image")
    ranks = [build_train_loader(tmp_path, image_size=SIZE, batch_size=1, rank=r, world_size=2, num_workers=0,
                                seed=0, augment="none") for r in (0, 1)]
    streams = [iter(loader) for loader in ranks]
    repeats, previous = 0, None
    for step in range(8):  # four epochs: the broken file is drawn four times, by either rank
        batches = [next(s) for s in streams]
        assert ranks[0].state_dict() == ranks[1].state_dict(), step  # same position: nobody read ahead
        assert all(len(b.images_BCHW) == 1 for b in batches)
        for r, batch in enumerate(batches):
            if step and batch.num_skipped:  # the rank that drew it trains on its previous batch again
                repeats += 1
                assert torch.equal(batch.images_BCHW, previous[r].images_BCHW)
        previous = batches
    assert sum(loader.num_skipped_total for loader in ranks) == 4 and repeats >= 3


def test_prefetch_factor__shrinks_for_big_batches() -> None:
    from unic_cli.data.loader import prefetch_factor

    assert prefetch_factor(256, 224, 8) == 4  # 38 MB batches: 4 ahead per worker
    assert prefetch_factor(128, 1024, 4) == 1  # 400 MB batches (a SAM teacher's 1024 px): 4 in flight, 1.6 GB
    assert prefetch_factor(32, 1024, 4) == 4 and prefetch_factor(64, 1024, 4) == 2
