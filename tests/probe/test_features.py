"""Layouts, model resolution, the shared extraction pass and the feature cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from unic_cli.errors import DataError, ProbeError
from unic_cli.probe.cache import FeatureCache
from unic_cli.probe.encoder import load_encoder, resolve_model
from unic_cli.probe.features import extract_features
from unic_cli.probe.split import check_same_classes, find_splits, list_class_split, list_dense_split


def test_find_splits__prefers_test_then_val_and_names_what_is_missing(tmp_path, class_data):
    train, evaluation = find_splits(class_data, need_train=True, eval_split=None)
    assert (train.name, evaluation.name) == ("train", "val")
    shutil.rmtree(class_data / "train")
    with pytest.raises(DataError, match="has no train/ split.*found: val/"):
        find_splits(class_data, need_train=True, eval_split=None)
    assert find_splits(class_data, need_train=False, eval_split=None) == (None, class_data / "val")
    with pytest.raises(DataError, match="has no test/ split"):
        find_splits(class_data, need_train=False, eval_split="test")


def test_check_same_classes__names_the_folders_that_differ(class_data):
    (class_data / "val" / "green").rename(class_data / "val" / "gren")
    train, evaluation = list_class_split(class_data / "train"), list_class_split(class_data / "val")
    with pytest.raises(DataError, match=r"only in train/: green; only in val/: gren"):
        check_same_classes(train, evaluation)


def test_list_dense_split__names_images_without_masks(dense_data):
    for i in range(3):
        (dense_data / "train" / "masks" / f"00{i}.png").unlink()
    with pytest.raises(DataError, match=r"3 of 6 images .* no \.png in masks/ .*: 000\.jpg, 001\.jpg, 002\.jpg"):
        list_dense_split(dense_data / "train", "masks")
    split = list_dense_split(dense_data / "test", "depth")
    assert [p.stem for p in split.images] == [p.stem for p in split.targets] == ["000", "001", "002"]


def test_resolve_model__bare_timm_name_and_local_weights_key_the_cache(teacher_weights):
    bare = resolve_model("test_vit")
    assert bare.kind == "teacher" and bare.spec.text == "timm:test_vit" and bare.image_size == 160
    local = resolve_model(f"timm:test_vit={teacher_weights['test_vit']}")
    assert local.identity["weights"][0]["size"] == teacher_weights["test_vit"].stat().st_size
    dense = resolve_model("timm:test_vit", image_size=70)
    assert dense.image_size == 64  # the nearest multiple of the patch size
    with pytest.raises(ProbeError, match="folder without unic.json"):
        resolve_model(str(teacher_weights["test_vit"].parent))


def test_load_encoder__student_folder_gives_the_exported_tokens(student_dir):
    from unic_cli.export import load_student

    encoder = load_encoder(resolve_model(str(student_dir)))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    summary_BD, patch_BND, grid = encoder(images)
    want_summary, want_patch = load_student(student_dir).encode(images)
    assert grid == (4, 4) and encoder.ref.kind == "student"
    torch.testing.assert_close(summary_BD, want_summary, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patch_BND, want_patch, atol=1e-5, rtol=1e-5)
    dense = load_encoder(resolve_model(str(student_dir), image_size=96))
    assert dense(images)[2] == (6, 6)  # position embeddings resampled to the probe resolution


def test_load_encoder__a_student_with_a_register_and_no_class_token_summarises_by_mean_patch(tmp_path, pytestconfig):
    from unic_cli.export import export_student, load_student

    build = next(getattr(p, "_handmade_unic_checkpoint") for p in pytestconfig.pluginmanager.get_plugins()
                 if hasattr(p, "_handmade_unic_checkpoint"))
    checkpoint = build(tmp_path / "run" / "checkpoints" / "last.pt", student="test_vit3", blocks=(5, 8))
    folder = export_student(checkpoint, tmp_path / "student")
    encoder = load_encoder(resolve_model(str(folder)))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    summary_BD, patch_BND, _ = encoder(images)
    want_summary, _ = load_student(folder).encode(images)  # what was distilled: the mean patch token
    torch.testing.assert_close(summary_BD, want_summary, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summary_BD, patch_BND.mean(dim=1), atol=1e-5, rtol=1e-5)


def test_extract_features__one_pass_then_the_cache(tmp_path, class_data, teacher_weights, caplog):
    refs = [resolve_model(f"timm:test_vit?image_size=32&weights={teacher_weights['test_vit']}"),
            resolve_model(f"timm:test_vit2?image_size=48&weights={teacher_weights['test_vit2']}")]
    splits = [list_class_split(class_data / "train"), list_class_split(class_data / "val")]
    cache = FeatureCache(tmp_path / "cache")
    args = dict(kind="pooled", cache=cache, batch_size=5, num_workers=0, device="cpu")
    first = extract_features(refs, splits, **args)
    assert first["train"][refs[0].name]["summary"].shape == (24, 64)
    assert first["val"][refs[1].name]["patch_mean"].shape == (12, 64) and first["val"][refs[1].name]["ok"].all()
    stamps = {p: p.stat().st_mtime_ns for p in cache.root.iterdir()}
    assert len(stamps) == 4
    caplog.set_level("INFO", logger="unic_cli")
    again = extract_features(refs, splits, **args)
    assert {p: p.stat().st_mtime_ns for p in cache.root.iterdir()} == stamps
    assert caplog.text.count("from the cache") == 4
    torch.testing.assert_close(again["val"][refs[0].name]["summary"], first["val"][refs[0].name]["summary"])
    # a changed file changes the dataset fingerprint: that split is extracted again, and its old entries,
    # whose key can never match again, are removed once the new ones are complete
    (class_data / "val" / "red" / "0.png").write_bytes((class_data / "val" / "red" / "1.png").read_bytes())
    os.utime(class_data / "val" / "red" / "0.png", ns=(1, 1))
    extract_features(refs, [list_class_split(class_data / "val")], **args)
    now = set(cache.root.iterdir())
    assert len(now) == 4 and {p for p in stamps if "-train-" in p.name} <= now
    assert not {p for p in stamps if "-val-" in p.name} & now


def test_extract_features__unreadable_images_are_flagged_not_fatal(tmp_path, class_data, teacher_weights):
    (class_data / "val" / "red" / "broken.png").write_bytes(b"not a png")
    split = list_class_split(class_data / "val")
    ref = resolve_model(f"timm:test_vit?image_size=32&weights={teacher_weights['test_vit']}")
    out = extract_features([ref], [split], kind="pooled", cache=FeatureCache(tmp_path), batch_size=4,
                           num_workers=0, device="cpu")["val"][ref.name]
    broken = [p.name for p in split.images].index("broken.png")
    assert out["ok"].sum() == len(split.images) - 1 and not out["ok"][broken]


def _extract(refs, splits, cache_dir, **kwargs):
    args = dict(kind="pooled", cache=FeatureCache(cache_dir), batch_size=4, num_workers=0, device="cpu")
    return extract_features(refs, splits, **{**args, **kwargs})


def test_run_jobs__an_interrupted_pass_resumes_after_its_last_whole_chunk(tmp_path, class_data, teacher_weights,
                                                                          caplog):
    ref = resolve_model(f"timm:test_vit?image_size=32&weights={teacher_weights['test_vit']}")
    split = list_class_split(class_data / "train")  # 24 images; 2 KiB of features per batch of 4
    plain = _extract([ref], [split], tmp_path / "plain")["train"][ref.name]
    cache = FeatureCache(tmp_path / "cache")
    folder = cache.path(ref, split, "pooled")

    def ctrl_c(label, done, total):  # the user presses Ctrl-C once 18 images are through
        if done >= 18:
            raise KeyboardInterrupt

    # a 4 KiB chunk holds 2 batches (2 KiB each): chunks of images 0-8 and 8-16 are written, 16-18 are lost
    caplog.set_level("INFO", logger="unic_cli")
    with pytest.raises(KeyboardInterrupt):
        _extract([ref], [split], cache.root, chunk_bytes=4096, progress=ctrl_c)
    assert "features of images 0-16 of 24 are kept" in caplog.text
    chunks = sorted(folder.iterdir())
    assert [p.name for p in chunks] == ["rows-000000000-000000008.safetensors", "rows-000000008-000000016.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in chunks]
    from safetensors.torch import load_file

    assert load_file(chunks[1])["summary"].shape == (8, 64)  # chunks are plain safetensors files
    assert cache.features(folder) is None  # not complete: never read as a cache hit
    seen = []
    resumed = _extract([ref], [split], cache.root, chunk_bytes=4096,
                       progress=lambda label, done, total: seen.append(done))["train"][ref.name]
    assert seen[0] == 16 and seen[-1] == 24  # only the last 8 images were decoded and encoded
    assert "resuming train/ features at image 16 of 24" in caplog.text
    assert [p.stat().st_mtime_ns for p in chunks] == stamps
    for key in ("summary", "patch_mean", "ok"):
        torch.testing.assert_close(resumed[key], plain[key], rtol=0, atol=0)


def test_feature_store__damaged_or_foreign_chunks_are_redone(tmp_path, class_data, teacher_weights, caplog):
    refs = [resolve_model(f"timm:{n}?image_size=32&weights={teacher_weights[n]}") for n in ("test_vit", "test_vit2")]
    split = list_class_split(class_data / "val")  # 12 images
    plain = {name: feats["summary"] for name, feats in  # read now: the files are damaged below
             _extract(refs, [split], tmp_path / "a", chunk_bytes=4096)["val"].items()}
    cache = FeatureCache(tmp_path / "a")
    first, second = (cache.path(ref, split, "pooled") for ref in refs)
    assert first != second  # another model never shares an entry
    last = sorted(first.glob("rows-*"))[-1]
    last.write_bytes(last.read_bytes()[:-10])  # a chunk cut short (a dying disk)
    middle = sorted(first.glob("rows-*"))[0]
    shutil.copy(sorted(second.glob("rows-*"))[0], middle)  # the other model's rows under this entry's name
    caplog.set_level("WARNING", logger="unic_cli")
    again = _extract(refs, [split], tmp_path / "a", chunk_bytes=4096)["val"]
    assert caplog.text.count("is damaged") == 2 and "do not match" in caplog.text
    assert "lacks rows it once held" in caplog.text  # a complete entry is checked too, not trusted
    for ref in refs:
        torch.testing.assert_close(again[ref.name]["summary"], plain[ref.name], rtol=0, atol=0)


def test_run_jobs__a_full_disk_names_the_cache_and_the_fix(tmp_path, class_data, teacher_weights, monkeypatch):
    import builtins
    import errno

    from unic_cli import files

    ref = resolve_model(f"timm:test_vit?image_size=32&weights={teacher_weights['test_vit']}")
    split = list_class_split(class_data / "val")
    folder = FeatureCache(tmp_path / "cache").path(ref, split, "pooled")

    class FullDisk:  # a cache file on a full disk: every write fails with ENOSPC (as /dev/full answers)
        def __init__(self, *args, **kwargs):
            self.file = builtins.open(*args, **kwargs)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(files, "open", FullDisk, raising=False)  # the open of unic's atomic writes, nothing else
    with pytest.raises(ProbeError, match=r"disk holding the feature cache .* is full .*--cache-dir.* resumes"):
        _extract([ref], [split], tmp_path / "cache")
    monkeypatch.undo()
    from unic_cli.probe.features import Job, _check_disk

    with pytest.raises(ProbeError, match=r"need about .* GiB in the cache .* free"):
        _check_disk([Job("m", 32, folder, lambda im: {}, {})], {"m": 2**50}, {"m": 10**6})


def test_row_store__memory_mapped_rows_equal_the_loaded_tensor(tmp_path):
    from unic_cli.probe.cache import FeatureStore, Features

    patch_MND = torch.randn(10, 6, 4).half()
    store = FeatureStore(tmp_path / "m-val-patch-0123")
    for start in range(0, 10, 3):  # chunks of 3, 3, 3, 1 rows
        store.write_chunk(start, {"patch": patch_MND[start : start + 3], "ok": torch.ones(3, dtype=torch.bool)[
            : len(patch_MND[start : start + 3])]}, "test")
    store.finish(10, {})
    rows = Features(store)["patch"]
    assert rows.shape == (10, 6, 4) and rows.nbytes == patch_MND.numel() * 2
    idx = torch.tensor([9, 0, 4, 4, 3])
    assert torch.equal(rows.take(idx), patch_MND[idx]) and torch.equal(rows.load(), patch_MND)
    keep = torch.tensor([True, False] * 5)
    assert torch.equal(rows[keep].take(torch.tensor([4, 1])), patch_MND[keep][[4, 1]])
    assert torch.equal(rows[keep].take(slice(1, 3)), patch_MND[keep][1:3])


@pytest.mark.slow
def test_extract_features__a_killed_process_is_resumed(tmp_path, class_data, teacher_weights):
    """SIGKILL (no cleanup at all) a real extraction after two chunks; the next call computes only the rest."""
    model = f"timm:test_vit?image_size=32&weights={teacher_weights['test_vit']}"
    script = f"""
import time, torch
from pathlib import Path
from unic_cli.probe.cache import FeatureCache
from unic_cli.probe.encoder import resolve_model
from unic_cli.probe.features import extract_features
from unic_cli.probe.split import list_class_split
torch.set_num_threads(1)
extract_features([resolve_model({model!r})], [list_class_split(Path({str(class_data / 'train')!r}))],
                 kind="pooled", cache=FeatureCache(Path({str(tmp_path / 'cache')!r})), batch_size=4, num_workers=0,
                 device="cpu", chunk_bytes=4096, progress=lambda label, done, total: time.sleep(0.5))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    ref, split = resolve_model(model), list_class_split(class_data / "train")
    folder = FeatureCache(tmp_path / "cache").path(ref, split, "pooled")
    deadline = time.monotonic() + 60
    while len(list(folder.glob("rows-*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    chunks = {p.name: p.stat().st_mtime_ns for p in folder.glob("rows-*")}
    assert 2 <= len(chunks) < 3 and not (folder / "complete.json").exists()
    seen = []
    resumed = _extract([ref], [split], tmp_path / "cache", chunk_bytes=4096,
                       progress=lambda label, done, total: seen.append(done))["train"][ref.name]
    assert seen[0] == 16  # decoding started after the two whole chunks
    assert all(p.stat().st_mtime_ns == chunks[p.name] for p in folder.glob("rows-*") if p.name in chunks)
    plain = _extract([ref], [split], tmp_path / "plain")["train"][ref.name]
    torch.testing.assert_close(resumed["summary"], plain["summary"], rtol=0, atol=0)


def test_run_jobs__models_resuming_at_different_images_share_one_pass(tmp_path, class_data, teacher_weights):
    refs = [resolve_model(f"timm:{n}?image_size=32&weights={teacher_weights[n]}") for n in ("test_vit", "test_vit2")]
    split = list_class_split(class_data / "train")
    plain = {n: f["summary"] for n, f in _extract(refs, [split], tmp_path / "plain")["train"].items()}

    def ctrl_c(label, done, total):
        if done >= 18:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the first model alone: chunks of images 0-8 and 8-16
        _extract(refs[:1], [split], tmp_path / "cache", chunk_bytes=4096, progress=ctrl_c)
    # both models, batches of 5: the second starts at image 0, the first joins inside the batch of images 15-19
    both = _extract(refs, [split], tmp_path / "cache", chunk_bytes=4096, batch_size=5)["train"]
    for ref in refs:
        torch.testing.assert_close(both[ref.name]["summary"], plain[ref.name], rtol=0, atol=0)


def test_remove_superseded__only_complete_entries_of_the_same_slot_go(tmp_path, class_data, teacher_weights):
    from unic_cli.probe.cache import FeatureStore

    weights = shutil.copy(teacher_weights["test_vit"], tmp_path / "w.safetensors")  # touched below
    split = list_class_split(class_data / "val")
    cache_dir = tmp_path / "cache"
    model = f"timm:test_vit?image_size=32&weights={weights}"
    kept = [_extract([resolve_model(f"timm:test_vit?image_size=48&weights={weights}")], [split], cache_dir),  # size
            _extract([resolve_model(model, pretrained=False, seed=3)], [split], cache_dir)]  # a random-init seed
    other = list_class_split(shutil.copytree(class_data, tmp_path / "other") / "val")
    kept.append(_extract([resolve_model(model)], [other], cache_dir))  # another dataset, same split name
    old = _extract([resolve_model(model)], [split], cache_dir)["val"][model].store.folder
    stale_v1 = old.with_name(old.name.rsplit("-", 1)[0] + "-0123abcd.safetensors")
    stale_v1.write_bytes(b"an entry of feature version 1")
    unfinished = FeatureStore(old.with_name(old.name.rsplit("-", 1)[0] + "-feedbeef"))
    unfinished.write_chunk(0, {"summary": torch.zeros(2, 4), "ok": torch.ones(2, dtype=torch.bool)}, "test")
    before = set(cache_dir.iterdir())
    time.sleep(0.01)
    weights.touch()  # new weights (mtime): a new key for the same model, split, kind, size and seed
    new = _extract([resolve_model(model)], [split], cache_dir)["val"][model].store.folder
    assert set(cache_dir.iterdir()) == (before - {old, stale_v1}) | {new}
    assert unfinished.folder.is_dir() and all(f["val"] for f in kept)


def test_read_target__16_bit_png_depth_is_scaled_and_8_bit_png_depth_is_refused(tmp_path, dense_data):
    import numpy as np
    from PIL import Image

    from unic_cli.probe.features import load_targets
    from unic_cli.probe.target import read_target

    millimetres = np.array([[0, 1000, 2500], [65535, 10, 1]], dtype=np.uint16)
    Image.fromarray(millimetres).save(tmp_path / "d16.png")  # PIL mode I;16, as depth datasets ship it
    assert Image.open(tmp_path / "d16.png").mode == "I;16"
    depth = read_target(tmp_path / "d16.png", "depth", depth_scale=1000.0)
    assert depth.dtype == np.float32 and depth.ravel().tolist() == pytest.approx([0, 1, 2.5, 65.535, 0.01, 0.001])
    for mode in ("L", "P"):  # 8-bit grey and palette PNGs
        Image.fromarray(np.array([[0, 128], [255, 3]], dtype=np.uint8)).convert(mode).save(tmp_path / f"{mode}.png")
        with pytest.raises(DataError, match=rf"is a 8-bit PNG \(mode {mode}\).*at most 0.255 m.*16-bit PNG"):
            read_target(tmp_path / f"{mode}.png", "depth", depth_scale=1000.0)
        assert read_target(tmp_path / f"{mode}.png", "mask").tolist() == [[0, 128], [255, 3]]  # masks: 8-bit is right
    # a split whose later files are 8-bit: one error in this process naming them, before any loader worker
    split = list_dense_split(dense_data / "train", "depth")
    for name in ("003.png", "005.png"):
        Image.fromarray(np.full((36, 48), 20, dtype=np.uint8)).save(dense_data / "train" / "depth" / name)
    with pytest.raises(DataError, match=r"003\.png' is a 8-bit PNG.*\(2 of 6 files, e\.g\. 003\.png, 005\.png\)"):
        load_targets(split, "depth", cache=FeatureCache(tmp_path / "cache"), depth_scale=1000.0, num_workers=0)


def test_load_native_targets__ragged_layout_at_each_target_s_own_size_memory_mapped_and_cached(
        tmp_path, mixed_dense_data, caplog):
    from safetensors import safe_open

    from unic_cli.probe.features import load_native_targets, load_targets
    from unic_cli.probe.target import read_target

    data, sizes = mixed_dense_data, [(36, 48), (20, 30), (64, 16), (36, 48), (9, 70)]
    split = list_dense_split(data / "test", "masks")
    cache = FeatureCache(tmp_path / "cache")
    masks = load_native_targets(split, "mask", cache=cache, depth_scale=1000.0, num_workers=0)
    assert masks.shapes_M2.tolist() == [list(s) for s in sizes] and masks.dtype == torch.uint8
    for i, path in enumerate(split.targets):
        assert torch.equal(masks.image(i), torch.from_numpy(read_target(path, "mask")).to(torch.uint8))
    # stored ragged: one flat buffer of exactly the split's pixels, no [M, Hmax, Wmax] padding
    [path] = (tmp_path / "cache").glob("targets-test-mask-native-*.safetensors")
    with safe_open(path, framework="pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    pixels = sum(h * w for h, w in sizes)
    assert stored == {"flat": [pixels], "offsets": [5], "shapes": [5, 2]}
    assert path.stat().st_size < pixels + 1024 < 5 * 64 * 70  # uint8, plus offsets, shapes and the header
    if os.path.exists("/proc/self/maps"):  # mapped from the cache file, not read into memory (Linux tells which)
        ptr = masks.flat_P.data_ptr()
        with open("/proc/self/maps") as f:
            mapped = [line.split()[-1] for line in f
                      if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)]
        assert mapped == [str(path)]
    # the second call reads the cache; the key and name differ from the resized (training) targets' file
    stamp = path.stat().st_mtime_ns
    again = load_native_targets(split, "mask", cache=cache, depth_scale=1000.0, num_workers=0)
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.flat_P, masks.flat_P)
    resized = load_targets(split, "mask", cache=cache, depth_scale=1000.0, num_workers=0)
    assert resized.shape == (5, 36, 48) and len(list((tmp_path / "cache").iterdir())) == 2
    # a damaged file is read again from the masks
    path.write_bytes(path.read_bytes()[:-10])
    caplog.set_level("WARNING", logger="unic_cli")
    repaired = load_native_targets(split, "mask", cache=cache, depth_scale=1000.0, num_workers=0)
    assert "ignoring unreadable cache file" in caplog.text and torch.equal(repaired.flat_P, masks.flat_P)
    depth = load_native_targets(list_dense_split(data / "test", "depth"), "depth", cache=cache, depth_scale=1000.0,
                                num_workers=0)
    assert depth.dtype == torch.float32 and depth.image(4).shape == (9, 70) and float(depth.image(4).max()) == 3.0
