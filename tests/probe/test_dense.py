"""Dense probes: linear heads on patch tokens, upsampled to the target size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unic_cli.probe.dense import run_depth_probe, run_seg_probe


def _scene(num_images: int, seed: int, grid=(4, 4), size=(16, 16), dim=8):
    """Patch tokens that encode a per-patch label (0-2) as a noisy one-hot, and the label map at full size."""
    gen = torch.Generator().manual_seed(seed)
    labels_Mhw = torch.randint(0, 3, (num_images, *grid), generator=gen)
    tokens_MND = F.one_hot(labels_Mhw.flatten(1), dim).float() * 4 + 0.1 * torch.randn(num_images, 16, dim,
                                                                                           generator=gen)
    masks_MHW = F.interpolate(labels_Mhw[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return tokens_MND.half(), masks_MHW


def test_run_seg_probe__learns_labels_and_ignores_void_pixels():
    train_x, train_y = _scene(12, seed=0)
    test_x, test_y = _scene(4, seed=1)
    train_y[:, :2] = 255
    test_y[:, :2] = 255  # void rows: never counted, whatever the head predicts there
    metrics = run_seg_probe(train_x, train_y, test_x, test_y, grid=(4, 4), num_classes=3, num_steps=150,
                            batch_size=4, lr=3e-2)
    assert metrics["miou"] > 0.9 and metrics["pixel_acc"] > 0.9 and metrics["num_classes"] == 3


def test_run_seg_probe__custom_ignore_index():
    train_x, train_y = _scene(8, seed=0)
    train_y[train_y == 2] = 11
    test_x, test_y = _scene(2, seed=1)
    test_y[test_y == 2] = 11
    metrics = run_seg_probe(train_x, train_y, test_x, test_y, grid=(4, 4), num_classes=2, ignore_index=11,
                            num_steps=100, batch_size=4, lr=3e-2)
    assert metrics["miou"] > 0.9


def test_run_depth_probe__bins_and_regression_recover_depth():
    train_x, train_y = _scene(12, seed=0)
    test_x, test_y = _scene(4, seed=1)
    train_depth, test_depth = 1.0 + train_y.float(), 1.0 + test_y.float()  # 1, 2 or 3 metres
    train_depth[:, 0] = 0.0  # invalid pixels are left out of training and scores
    for bins in (16, 0):
        metrics = run_depth_probe(train_x, train_depth, test_x, test_depth, grid=(4, 4), num_bins=bins,
                                  num_steps=150, batch_size=4, lr=3e-2)
        # predicting the mean depth scores delta1 = 1/3 here; patch borders blur under bilinear upsampling of a
        # 4x4 grid, hence not 1.0
        assert metrics["delta1"] > 0.7 and metrics["rmse"] < 0.5, (bins, metrics)
        assert metrics["head"] == ("bins" if bins else "regression")


def _row_store(tmp_path, patch_MND, rows_per_chunk=5):
    from unic_cli.probe.cache import Features, FeatureStore

    store = FeatureStore(tmp_path / f"m-{len(patch_MND)}-patch-0123")
    for start in range(0, len(patch_MND), rows_per_chunk):
        part = patch_MND[start : start + rows_per_chunk]
        store.write_chunk(start, {"patch": part, "ok": torch.ones(len(part), dtype=torch.bool)}, "test")
    store.finish(len(patch_MND), {})
    return Features(store)["patch"]


def test_run_seg_probe__memory_mapped_features_give_the_same_scores(tmp_path):
    # the path ADE20K-size features take (read per batch from the cache) must equal the in-memory one
    train_x, train_y = _scene(12, seed=0)
    test_x, test_y = _scene(4, seed=1)
    args = dict(grid=(4, 4), num_classes=3, num_steps=30, batch_size=4, lr=3e-2)
    plain = run_seg_probe(train_x, train_y.to(torch.uint8), test_x, test_y, **args)
    mapped = run_seg_probe(_row_store(tmp_path, train_x), train_y.to(torch.uint8), _row_store(tmp_path, test_x),
                           test_y, **args)
    assert mapped == plain
    depth_y = train_y.float() + 1
    args = dict(grid=(4, 4), num_steps=20, batch_size=4, num_bins=8)
    assert (run_depth_probe(_row_store(tmp_path, train_x), depth_y, test_x, test_y.float() + 1, **args)
            == run_depth_probe(train_x, depth_y, test_x, test_y.float() + 1, **args))


def test_channel_stats__streamed_subset_equals_the_in_memory_subset(tmp_path):
    from unic_cli.probe.dense import _channel_stats

    patch_MND = torch.randn(13, 16, 8).half()
    for max_rows in (7, 50, 10_000):  # strides across chunk and image boundaries, and no stride
        want = _channel_stats(patch_MND, torch.device("cpu"), max_rows=max_rows)
        got = _channel_stats(_row_store(tmp_path, patch_MND, rows_per_chunk=3), torch.device("cpu"),
                             max_rows=max_rows)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_seg_scores__match_an_mmseg_style_reference_on_random_masks():
    import numpy as np

    from unic_cli.probe.dense import seg_confusion, seg_scores

    rng = np.random.default_rng(0)
    for _ in range(20):
        K, shape = int(rng.integers(2, 10)), (2, int(rng.integers(3, 20)), int(rng.integers(3, 20)))
        true = rng.choice(rng.choice(K, int(rng.integers(1, K + 1)), replace=False), shape)  # some classes absent
        true[rng.random(shape) < 0.2] = 255
        pred = rng.choice(rng.choice(K, int(rng.integers(1, K + 1)), replace=False), shape)
        keep = (rng.random(shape) < 0.5) & (true != 255)
        pred[keep] = true[keep]
        # reference: intersect / union per class over non-ignored pixels, nanmean (absent from both: 0 / 0)
        valid = true != 255
        t, p = true[valid], pred[valid]
        inter = np.bincount(t[p == t], minlength=K).astype(float)
        union = np.bincount(p, minlength=K) + np.bincount(t, minlength=K) - inter
        with np.errstate(invalid="ignore"):
            want_miou = np.nanmean(inter / union)
        confusion = sum(seg_confusion(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(true[i : i + 1]).byte(),
                                      num_classes=K, ignore_index=255) for i in range(2))
        got = seg_scores(confusion)
        assert got["miou"] == pytest.approx(want_miou, abs=1e-12)
        assert got["pixel_acc"] == pytest.approx(inter.sum() / valid.sum(), abs=1e-12)


def test_seg_scores__a_class_only_predicted_counts_zero_and_one_absent_from_both_is_left_out():
    from unic_cli.probe.dense import seg_scores

    # classes 0, 1 in the truth; class 2 only predicted; class 3 nowhere
    confusion = torch.tensor([[3, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert seg_scores(confusion)["miou"] == pytest.approx((3 / 4 + 1.0 + 0.0) / 3)


def test_depth_errors__per_image_metrics_match_the_depth_toolbox_reference():
    import numpy as np

    from unic_cli.probe.dense import depth_errors

    rng = np.random.default_rng(0)
    true = rng.uniform(0.5, 10, (4, 9, 11))
    true[rng.random(true.shape) < 0.3] = 0  # invalid pixels
    true[0] = 0  # an image without a valid pixel is not scored
    pred = np.clip(true * rng.uniform(0.6, 1.5, true.shape), 0.5, 10)
    errors, scored = depth_errors(torch.from_numpy(pred), torch.from_numpy(true))
    assert scored.tolist() == [False, True, True, True]
    for i in (1, 2, 3):  # Eigen et al.'s metrics as BTS / the Monocular-Depth-Estimation-Toolbox compute them
        m = true[i] > 0
        p, t = pred[i][m], true[i][m]
        want = [np.sqrt(((t - p) ** 2).mean()), np.mean(np.abs(t - p) / t), (np.maximum(t / p, p / t) < 1.25).mean()]
        assert errors[i].tolist() == pytest.approx(want, abs=1e-12)


def test_run_depth_probe__averages_per_image_not_per_pixel():
    # one depth bin: every prediction is the bin centre, the training minimum (1 m). Image 0 has 2 valid pixels
    # at 3 m, image 1 has 256 at 1.2 m. Per image, then averaged (the toolboxes' protocol): RMSE (2 + 0.2) / 2;
    # pooled over pixels it would be sqrt((2 * 4 + 256 * 0.04) / 258) = 0.27 and delta1 256 / 258
    tokens = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    train = torch.full((2, 16, 16), 2.0)
    train[0, 0, 0] = 1.0
    test = torch.full((2, 16, 16), 1.2)
    test[0] = 0.0
    test[0, 0, :2] = 3.0
    metrics = run_depth_probe(tokens, train, tokens, test, grid=(4, 4), num_bins=1, num_steps=1)
    assert metrics["rmse"] == pytest.approx(1.1)
    assert metrics["abs_rel"] == pytest.approx((2 / 3 + 0.2 / 1.2) / 2)
    assert metrics["delta1"] == pytest.approx(0.5)
    nothing = run_depth_probe(tokens, train, tokens, torch.zeros(2, 16, 16), grid=(4, 4), num_bins=1, num_steps=1)
    assert all(math.isnan(nothing[m]) for m in ("rmse", "abs_rel", "delta1"))  # not a perfect 0 RMSE


# ---- scoring at each test image's own target size (mmsegmentation / depth toolbox protocol) --------------------

MIXED_SIZES = [(20, 28), (13, 17), (20, 28), (20, 28), (31, 9), (16, 16), (7, 40)]  # batch 4: runs of 1, 2, 3 sizes


def _masks_at(labels_Mhw: torch.Tensor, sizes) -> list[torch.Tensor]:
    """Each image's label grid upsampled (nearest) to its own size, with void top rows."""
    masks = []
    for labels_hw, size in zip(labels_Mhw, sizes):
        mask_HW = F.interpolate(labels_hw[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
        mask_HW[:3] = 255
        masks.append(mask_HW)
    return masks


def _mixed_scene(sizes, seed: int):
    gen = torch.Generator().manual_seed(seed)
    labels_Mhw = torch.randint(0, 3, (len(sizes), 4, 4), generator=gen)
    tokens_MND = F.one_hot(labels_Mhw.flatten(1), 8).float() * 4 + 0.5 * torch.randn(len(sizes), 16, 8, generator=gen)
    return tokens_MND.half(), _masks_at(labels_Mhw, sizes)


SEG = dict(grid=(4, 4), num_classes=3, ignore_index=255, num_steps=25, batch_size=4, lr=3e-2, weight_decay=1e-4,
           seed=0)


def _seg_before_native_sizes(head, test_x, test_masks_MHW):
    """run_seg_probe's scoring loop before test masks kept their own sizes (verbatim, on a trained head)."""
    from unic_cli.probe.dense import seg_confusion, seg_scores

    confusion_KK = torch.zeros(3, 3, dtype=torch.long)
    size = tuple(test_masks_MHW.shape[-2:])
    with torch.no_grad():
        for start in range(0, test_x.shape[0], 4):
            pred_BHW = head(test_x[start : start + 4], size).argmax(dim=1)
            true_BHW = test_masks_MHW[start : start + 4]
            confusion_KK += seg_confusion(pred_BHW, true_BHW, num_classes=3, ignore_index=255)
    return {**seg_scores(confusion_KK), "num_classes": 3}


def test_run_seg_probe__one_mask_size_scores_bit_identical_to_before(tmp_path):
    from unic_cli.probe.dense import _fit_seg_head
    from unic_cli.probe.target import RaggedTargets

    train_x, train_y = _scene(12, seed=0)
    test_x, masks = _mixed_scene([(20, 28)] * 5, seed=1)
    test_y = torch.stack(masks)
    head = _fit_seg_head(train_x, train_y.to(torch.uint8), device=torch.device("cpu"), **SEG)
    before = _seg_before_native_sizes(head, test_x, test_y)
    assert before["miou"] < 0.99  # errors to reproduce, not a perfect score any scoring would give
    for targets in (test_y, RaggedTargets.from_images(masks), RaggedTargets.from_dense(test_y)[torch.ones(5) > 0]):
        assert run_seg_probe(train_x, train_y.to(torch.uint8), test_x, targets, **SEG) == before  # exact


def _seg_reference(head, test_x, masks, batch_size=4):
    """mmsegmentation's protocol, written out: per image, logits upsampled (bilinear) to its mask, argmax; one
    confusion matrix over all images; IoU per class present in truth or prediction, averaged (numpy)."""
    import numpy as np

    confusion = np.zeros((3, 3), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(masks), batch_size):
            logits_BKhw = head.grid_logits(test_x[start : start + batch_size])
            for logits_Khw, mask in zip(logits_BKhw, masks[start : start + batch_size]):
                pred = F.interpolate(logits_Khw[None], size=tuple(mask.shape), mode="bilinear",
                                     align_corners=False)[0].argmax(0).numpy()
                true = mask.numpy().astype(np.int64)
                keep = true != 255
                confusion += np.bincount(true[keep] * 3 + pred[keep], minlength=9).reshape(3, 3)
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return {"miou": float(np.mean(tp[union > 0] / union[union > 0])), "pixel_acc": float(tp.sum() / confusion.sum())}


def test_run_seg_probe__mixed_mask_sizes_are_scored_each_at_its_own_size():
    from unic_cli.probe.dense import _fit_seg_head, _native_batches
    from unic_cli.probe.target import RaggedTargets, _resize_target

    train_x, train_y = _scene(12, seed=0)
    test_x, masks = _mixed_scene(MIXED_SIZES, seed=1)
    head = _fit_seg_head(train_x, train_y.to(torch.uint8), device=torch.device("cpu"), **SEG)
    want = _seg_reference(head, test_x, masks)
    got = run_seg_probe(train_x, train_y.to(torch.uint8), test_x, RaggedTargets.from_images(masks), **SEG)
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-12)
    assert got["pixel_acc"] == pytest.approx(want["pixel_acc"], abs=1e-12)
    # the former scoring (every mask resized to the first one's size) gives other numbers on such a split
    first = torch.stack([torch.from_numpy(_resize_target(m.numpy(), MIXED_SIZES[0])) for m in masks])
    assert run_seg_probe(train_x, train_y.to(torch.uint8), test_x, first, **SEG)["miou"] != got["miou"]
    # a subset (the rows of readable images) scores only its images; tiny upsampling groups change nothing
    keep = torch.tensor([True, False, True, True, False, True, True])
    subset = run_seg_probe(train_x, train_y.to(torch.uint8), test_x[keep], RaggedTargets.from_images(masks)[keep],
                           **SEG)
    assert subset["miou"] == pytest.approx(_seg_reference(head, test_x[keep], [m for m, k in zip(masks, keep) if k])
                                           ["miou"], abs=1e-12)
    ragged = RaggedTargets.from_images(masks)
    with torch.no_grad():
        whole = [(x.clone(), t) for x, t in _native_batches(head, test_x, ragged, batch_size=4, device="cpu")]
        split = [(x.clone(), t) for x, t in _native_batches(head, test_x, ragged, batch_size=4, device="cpu",
                                                             max_elements=3 * 20 * 28)]
    assert [len(t) for _, t in whole] == [1, 1, 2, 1, 1, 1] and [len(t) for _, t in split] == [1, 1, 1, 1, 1, 1, 1]
    assert torch.equal(torch.cat([x for x, _ in whole[2:3]]), torch.cat([x for x, _ in split[2:4]]))


def test_run_depth_probe__mixed_depth_map_sizes_are_scored_each_at_its_own_size():
    import numpy as np

    from unic_cli.probe.dense import _fit_depth_head
    from unic_cli.probe.target import RaggedTargets

    train_x, train_y = _scene(12, seed=0)
    test_x, masks = _mixed_scene(MIXED_SIZES, seed=1)
    depths = [torch.where(m == 255, 0.0, m.float() + 1.0) for m in masks]  # 1-3 m, void rows invalid
    depths[1].zero_()  # an image without a valid pixel is not scored
    train_depth = train_y.float() + 1
    args = dict(grid=(4, 4), num_bins=8, num_steps=25, batch_size=4, lr=3e-2, weight_decay=1e-4, seed=0)
    got = run_depth_probe(train_x, train_depth, test_x, RaggedTargets.from_images(depths), **args)
    # reference: the depth toolboxes' per-image metrics at each map's own size, then the mean over images
    head, _, _ = _fit_depth_head(train_x, train_depth, device=torch.device("cpu"), **args)
    centres_K = torch.linspace(1.0, 3.0, 8)  # bins between the training min and max
    per_image = []
    with torch.no_grad():
        for i, true_HW in enumerate(depths):
            logits_KHW = F.interpolate(head.grid_logits(test_x[i : i + 1]), size=tuple(true_HW.shape),
                                       mode="bilinear", align_corners=False)[0]
            pred = (logits_KHW.softmax(0) * centres_K[:, None, None]).sum(0).clamp(1.0, 3.0).double().numpy()
            t = true_HW.double().numpy()
            if (t > 0).any():
                p, t = pred[t > 0], t[t > 0]
                per_image.append([np.sqrt(((p - t) ** 2).mean()), np.mean(np.abs(p - t) / t),
                                  np.mean(np.maximum(p / t, t / p) < 1.25)])
    want = np.mean(per_image, axis=0)
    assert [got["rmse"], got["abs_rel"], got["delta1"]] == pytest.approx(want.tolist(), rel=1e-6)


def test_run_depth_probe__one_map_size_scores_bit_identical_to_before():
    from unic_cli.probe.dense import _fit_depth_head, depth_errors
    from unic_cli.probe.target import RaggedTargets

    train_x, train_y = _scene(12, seed=0)
    test_x, masks = _mixed_scene([(20, 28)] * 5, seed=1)
    test_depth = torch.stack([torch.where(m == 255, 0.0, m.float() + 1.0) for m in masks])
    for bins in (8, 0):
        args = dict(grid=(4, 4), num_bins=bins, num_steps=25, batch_size=4, lr=3e-2, weight_decay=1e-4, seed=0)
        head, predict, mode = _fit_depth_head(train_x, train_y.float() + 1, device=torch.device("cpu"), **args)
        # run_depth_probe's scoring loop before depth maps kept their own sizes (verbatim)
        sums_3, num_scored = torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.long)
        with torch.no_grad():
            for start in range(0, 5, 4):
                pred_BHW = predict(head(test_x[start : start + 4], (20, 28))).clamp(1.0, 3.0)
                errors_B3, scored_B = depth_errors(pred_BHW, test_depth[start : start + 4])
                sums_3 += (errors_B3 * scored_B[:, None]).sum(dim=0)
                num_scored += scored_B.sum()
        rmse, abs_rel, delta1 = (sums_3 / num_scored).tolist()
        before = {"rmse": rmse, "abs_rel": abs_rel, "delta1": delta1, "head": mode}
        for targets in (test_depth, RaggedTargets.from_images(list(test_depth))):
            assert run_depth_probe(train_x, train_y.float() + 1, test_x, targets, **args) == before  # exact
