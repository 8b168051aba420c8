"""Layouts, model resolution, the shared extraction pass and the feature cache."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from unic_cli.errors import DataError, ProbeError
from unic_cli.probe.features import (
    FeatureCache,
    check_same_classes,
    extract_features,
    find_splits,
    list_class_split,
    list_dense_split,
    load_encoder,
    resolve_model,
)


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
    # a changed file changes the dataset fingerprint: that split is extracted again
    (class_data / "val" / "red" / "0.png").write_bytes((class_data / "val" / "red" / "1.png").read_bytes())
    os.utime(class_data / "val" / "red" / "0.png", ns=(1, 1))
    extract_features(refs, [list_class_split(class_data / "val")], **args)
    assert len(list(cache.root.iterdir())) == 6


def test_extract_features__unreadable_images_are_flagged_not_fatal(tmp_path, class_data, teacher_weights):
    (class_data / "val" / "red" / "broken.png").write_bytes(b"not a png")
    split = list_class_split(class_data / "val")
    ref = resolve_model(f"timm:test_vit?image_size=32&weights={teacher_weights['test_vit']}")
    out = extract_features([ref], [split], kind="pooled", cache=FeatureCache(tmp_path), batch_size=4,
                           num_workers=0, device="cpu")["val"][ref.name]
    broken = [p.name for p in split.images].index("broken.png")
    assert out["ok"].sum() == len(split.images) - 1 and not out["ok"][broken]
