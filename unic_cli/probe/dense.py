"""Linear heads on cached patch tokens for semantic segmentation (mIoU, pixel accuracy) and depth (RMSE, delta1).

Shape legend: B batch, G images of one size within a batch, N patch tokens (h*w), D token width, K outputs
(classes or depth bins), H/W target pixels.

The head is one linear map per patch token (a 1x1 convolution on the patch grid); its logits are upsampled
bilinearly to the target's size and trained there, so the probe measures the patch tokens only. Features are
standardised per channel with training statistics, which makes one learning rate fit every encoder.

Training targets share one size (`features.load_targets`); test targets keep each image's own size
(`target.RaggedTargets`) and are scored there, as mmsegmentation and the depth toolboxes do: each test image's
logits are upsampled to its own mask or depth map, so every annotated pixel counts once, at the resolution it was
annotated at.

Patch features are a tensor or, when they do not fit in memory, a memory-mapped `RowStore` from the feature
cache: each training step then reads its batch's rows from disk; both give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from unic_cli.probe.cache import RowStore
from unic_cli.probe.target import RaggedTargets

Patches = torch.Tensor | RowStore
Targets = torch.Tensor | RaggedTargets

# Most logits upsampled at once while scoring (float32: 1 GiB). ADE20K's 150 classes at a 2048 px mask are 630 M
# values per image: such images go one at a time; CamVid's batches of 16 masks of 360x480 stay whole.
UPSAMPLE_ELEMENTS = 2**28


class _Head(torch.nn.Module):
    def __init__(self, mean_D: torch.Tensor, std_D: torch.Tensor, num_outputs: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("mean_D", mean_D)
        self.register_buffer("std_D", std_D)
        self.linear = torch.nn.Linear(mean_D.shape[0], num_outputs)
        self.grid = grid

    def grid_logits(self, patch_BND: torch.Tensor) -> torch.Tensor:
        """Logits on the patch grid, [B, K, h, w]."""
        x_BND = (patch_BND.float() - self.mean_D) / self.std_D
        return self.linear(x_BND).transpose(1, 2).unflatten(2, self.grid)

    @staticmethod
    def upsample(logits_BKhw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits_BKhw, size=size, mode="bilinear", align_corners=False)  # [B, K, H, W]

    def forward(self, patch_BND: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.upsample(self.grid_logits(patch_BND), size)


def _rows(patch_MND: Patches, idx: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    """Rows of a tensor or of a memory-mapped RowStore (read from disk now), on `device`."""
    if isinstance(patch_MND, RowStore):
        return patch_MND.take(idx.cpu() if isinstance(idx, torch.Tensor) else idx).to(device, non_blocking=True)
    return patch_MND[idx.to(patch_MND.device) if isinstance(idx, torch.Tensor) else idx].to(device)


def _device_of(patch_MND: Patches, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return patch_MND.device if isinstance(patch_MND, torch.Tensor) else torch.device("cpu")


def _channel_stats(patch_MND: Patches, device: torch.device, max_rows: int = 200_000
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    num_images, num_tokens = patch_MND.shape[:2]
    # a strided subset of the (image, token) rows is plenty for per-channel moments
    step = num_images * num_tokens // max_rows + 1 if num_images * num_tokens > max_rows else 1
    if isinstance(patch_MND, torch.Tensor):
        rows_ND = patch_MND.flatten(0, 1)[::step]
    else:  # the same rows, streamed from the cache in blocks of about 256 MiB
        per = max(1, 2**28 // max(1, patch_MND.nbytes // num_images))
        picked = []
        for first in range(0, num_images, per):
            block_ND = patch_MND.take(slice(first, first + per)).flatten(0, 1)
            picked.append(block_ND[(-first * num_tokens) % step :: step])
        rows_ND = torch.cat(picked)
    rows_ND = rows_ND.to(device).float()
    return rows_ND.mean(dim=0), rows_ND.std(dim=0).clamp_min(1e-6)


def _train_head(
    head: _Head,
    patch_MND: Patches,
    targets_MHW: torch.Tensor,
    loss_fn,
    *,
    device: torch.device,
    num_steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> _Head:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / num_steps)))
    size = tuple(targets_MHW.shape[-2:])
    for _ in range(num_steps):
        idx = torch.randint(patch_MND.shape[0], (batch_size,), generator=generator)
        loss = loss_fn(head(_rows(patch_MND, idx, device), size), targets_MHW[idx.to(targets_MHW.device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return head.eval()


def _native_batches(head: _Head, test_MND: Patches, targets: Targets, *, batch_size: int, device: torch.device,
                    max_elements: int = UPSAMPLE_ELEMENTS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits_GKHW, targets_GHW) on `device`: each test image's logits upsampled to its own target's size.

    The head runs on `batch_size` images at a time; within a batch, consecutive images of one size are upsampled
    together (all of them when a split has one size, as before targets were kept at their own sizes), in groups
    of at most `max_elements` logits.
    """
    ragged = targets if isinstance(targets, RaggedTargets) else RaggedTargets.from_dense(targets)
    shapes = [tuple(s) for s in ragged.shapes_M2.tolist()]  # one host read for the whole split
    num_outputs = head.linear.out_features
    for start in range(0, len(shapes), batch_size):
        logits_BKhw = head.grid_logits(_rows(test_MND, slice(start, start + batch_size), device))
        stop, first = start + len(logits_BKhw), start
        while first < stop:
            size = shapes[first]
            per = max(1, max_elements // max(1, num_outputs * size[0] * size[1]))
            last = first + 1
            while last < min(stop, first + per) and shapes[last] == size:
                last += 1
            yield (head.upsample(logits_BKhw[first - start : last - start], size),
                   ragged.stack(first, last).to(device, non_blocking=True))
            first = last


def run_seg_probe(
    train_MND: Patches,
    train_masks_MHW: torch.Tensor,
    test_MND: Patches,
    test_masks: Targets,
    *,
    grid: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
    num_steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train a linear segmentation head; mIoU over classes present in the test masks or predictions, pixel acc.

    The training masks share one size (their logits are upsampled to it); `test_masks` is a [M, H, W] tensor or
    a `RaggedTargets` of masks at their own sizes, each scored at its size: logits upsampled (bilinear) to the
    mask, argmax, one confusion matrix over every test pixel (mmsegmentation's protocol).
    `device` defaults to the features' device (the CPU for a RowStore). Masks stay in their narrow dtype
    (uint8) on the device and are widened per batch: ADE20K's train masks as int64 would take 56 GiB.
    """
    device = _device_of(train_MND, device)
    head = _fit_seg_head(train_MND, train_masks_MHW, grid=grid, num_classes=num_classes, ignore_index=ignore_index,
                         num_steps=num_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                         device=device)
    confusion_KK = torch.zeros(num_classes, num_classes, device=device, dtype=torch.long)
    with torch.no_grad():
        for logits_GKHW, true_GHW in _native_batches(head, test_MND, test_masks, batch_size=batch_size,
                                                     device=device):
            confusion_KK += seg_confusion(logits_GKHW.argmax(dim=1), true_GHW, num_classes=num_classes,
                                          ignore_index=ignore_index)
    return {**seg_scores(confusion_KK), "num_classes": num_classes}


def _fit_seg_head(train_MND: Patches, train_masks_MHW: torch.Tensor, *, grid: tuple[int, int], num_classes: int,
                  ignore_index: int, num_steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                  device: torch.device) -> _Head:
    train_masks_MHW = train_masks_MHW.to(device)
    mean_D, std_D = _channel_stats(train_MND, device)
    torch.manual_seed(seed)
    head = _Head(mean_D, std_D, num_classes, grid).to(device)

    def loss_fn(logits_BKHW, masks_BHW):
        return F.cross_entropy(logits_BKHW, masks_BHW.long(), ignore_index=ignore_index)

    return _train_head(head, train_MND, train_masks_MHW, loss_fn, num_steps=num_steps, batch_size=batch_size,
                       lr=lr, weight_decay=weight_decay, seed=seed, device=device)


def seg_confusion(pred_BHW: torch.Tensor, true_BHW: torch.Tensor, *, num_classes: int, ignore_index: int
                  ) -> torch.Tensor:
    """[K, K] pixel counts, rows the true class, columns the predicted one; `ignore_index` pixels (and labels
    outside 0..K-1) are left out."""
    true_BHW = true_BHW.long()
    valid = (true_BHW != ignore_index) & (true_BHW >= 0) & (true_BHW < num_classes)
    flat = torch.bincount(true_BHW[valid] * num_classes + pred_BHW[valid].long(), minlength=num_classes**2)
    return flat.view(num_classes, num_classes)


def seg_scores(confusion_KK: torch.Tensor) -> dict[str, float]:
    """mIoU and pixel accuracy of a confusion matrix, as mmsegmentation computes them.

    IoU = TP / (TP + FP + FN) per class, averaged over the classes present in the ground truth or the
    predictions: a class absent from both (0 / 0) is left out, a class only predicted counts with IoU 0.
    """
    confusion_KK = confusion_KK.double().cpu()
    tp_K = confusion_KK.diag()
    union_K = confusion_KK.sum(0) + confusion_KK.sum(1) - tp_K
    present_K = union_K > 0
    iou_K = tp_K[present_K] / union_K[present_K]
    return {"miou": float(iou_K.mean()) if bool(present_K.any()) else float("nan"),
            "pixel_acc": float(tp_K.sum() / confusion_KK.sum()) if bool(confusion_KK.sum() > 0) else float("nan")}


def run_depth_probe(
    train_MND: Patches,
    train_depth_MHW: torch.Tensor,
    test_MND: Patches,
    test_depth: Targets,
    *,
    grid: tuple[int, int],
    num_bins: int = 256,
    num_steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Train a linear depth head (bins classification with num_bins > 0, else L1 regression).

    Pixels with depth <= 0 (or non-finite) are invalid and ignored. With bins, the prediction is the
    softmax-weighted mean of the bin centres (uniform between the training minimum and maximum), as in the
    linear depth probes of DINOv2. The training maps share one size; `test_depth` is a [M, H, W] tensor or a
    `RaggedTargets` of maps at their own sizes, each predicted at its size (logits upsampled bilinearly, then
    the prediction). Returns RMSE, abs_rel and delta1 (share of pixels with max(pred/true, true/pred) < 1.25),
    each computed per test image over its valid pixels and averaged over the images (`depth_errors`); NaN when
    no test image has a valid pixel.
    """
    device = _device_of(train_MND, device)
    head, predict, mode = _fit_depth_head(train_MND, train_depth_MHW, grid=grid, num_bins=num_bins,
                                          num_steps=num_steps, batch_size=batch_size, lr=lr,
                                          weight_decay=weight_decay, seed=seed, device=device)
    sums_3 = torch.zeros(3, device=device, dtype=torch.float64)
    num_scored = torch.zeros((), device=device, dtype=torch.long)
    with torch.no_grad():
        for logits_GKHW, true_GHW in _native_batches(head, test_MND, test_depth, batch_size=batch_size,
                                                     device=device):
            errors_G3, scored_G = depth_errors(predict(logits_GKHW), true_GHW)
            sums_3 += (errors_G3 * scored_G[:, None]).sum(dim=0)
            num_scored += scored_G.sum()
    rmse, abs_rel, delta1 = (sums_3 / num_scored).tolist() if int(num_scored) else [float("nan")] * 3
    return {"rmse": rmse, "abs_rel": abs_rel, "delta1": delta1, "head": mode}


def _fit_depth_head(train_MND: Patches, train_depth_MHW: torch.Tensor, *, grid: tuple[int, int], num_bins: int,
                    num_steps: int, batch_size: int, lr: float, weight_decay: float, seed: int, device: torch.device
                    ) -> tuple[_Head, Callable[[torch.Tensor], torch.Tensor], Literal["bins", "regression"]]:
    """The trained head, logits_BKHW -> depth_BHW (clamped to the training range), and the head's mode."""
    train_depth_MHW = train_depth_MHW.to(device).float()
    valid_train = torch.isfinite(train_depth_MHW) & (train_depth_MHW > 0)
    low, high = train_depth_MHW[valid_train].min(), train_depth_MHW[valid_train].max()
    mean_D, std_D = _channel_stats(train_MND, device)
    torch.manual_seed(seed)
    mode: Literal["bins", "regression"] = "bins" if num_bins > 0 else "regression"
    head = _Head(mean_D, std_D, num_bins if mode == "bins" else 1, grid).to(device)
    centres_K = torch.linspace(0, 1, max(num_bins, 1), device=device) * (high - low) + low

    def predict(logits_BKHW):
        if mode == "bins":
            depth_BHW = (logits_BKHW.softmax(dim=1) * centres_K[None, :, None, None]).sum(dim=1)
        else:
            depth_BHW = logits_BKHW[:, 0] * high  # regression targets are depth / max depth
        return depth_BHW.clamp(low, high)

    def loss_fn(logits_BKHW, depth_BHW):
        valid = torch.isfinite(depth_BHW) & (depth_BHW > 0)
        if mode == "bins":
            bins_BHW = ((depth_BHW - low) / (high - low + 1e-12) * (num_bins - 1)).round().clamp(0, num_bins - 1)
            bins_BHW = torch.where(valid, bins_BHW, torch.full_like(bins_BHW, -1)).long()
            return F.cross_entropy(logits_BKHW, bins_BHW, ignore_index=-1)
        error_BHW = (logits_BKHW[:, 0] - depth_BHW / high).abs()
        return (error_BHW * valid).sum() / valid.sum().clamp_min(1)

    head = _train_head(head, train_MND, train_depth_MHW, loss_fn, num_steps=num_steps, batch_size=batch_size,
                       lr=lr, weight_decay=weight_decay, seed=seed, device=device)
    return head, predict, mode


def depth_errors(pred_BHW: torch.Tensor, true_BHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (rmse, abs_rel, delta1) over its valid pixels (finite true depth > 0) -> ([B, 3], scored [B]).

    The metrics of Eigen et al. (2014) as the depth toolboxes compute them (BTS, AdaBins, DINOv2's depth
    evaluation): each image's RMSE, mean |pred - true| / true and share of max(pred/true, true/pred) < 1.25,
    then averaged over the images; an image without a valid pixel is not scored. No median or least-squares
    scale alignment: the probe predicts metric depth.
    """
    true_BHW = true_BHW.double()
    valid_BHW = torch.isfinite(true_BHW) & (true_BHW > 0)
    t_BHW = torch.where(valid_BHW, true_BHW, torch.ones_like(true_BHW))  # placeholders: masked out below
    p_BHW = torch.where(valid_BHW, pred_BHW.double(), torch.ones_like(true_BHW))
    count_B = valid_BHW.sum(dim=(1, 2))
    denom_B = count_B.clamp_min(1)
    rmse_B = ((p_BHW - t_BHW).square() * valid_BHW).sum(dim=(1, 2)).div(denom_B).sqrt()
    abs_rel_B = ((p_BHW - t_BHW).abs() / t_BHW * valid_BHW).sum(dim=(1, 2)) / denom_B
    delta1_B = ((torch.maximum(p_BHW / t_BHW, t_BHW / p_BHW) < 1.25) & valid_BHW).sum(dim=(1, 2)).double() / denom_B
    return torch.stack([rmse_B, abs_rel_B, delta1_B], dim=1), count_B > 0
