"""Zero-shot: prompts through a real (tiny) OpenCLIP text tower, CLIP teachers and students with a CLIP head."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from unic_cli.config import ProbeConfig
from unic_cli.errors import ProbeError
from unic_cli.probe import run_probe
from unic_cli.probe.zeroshot import TEMPLATES, ClipSpace, clip_space_of, run_zeroshot_probe, text_classifier
from unic_cli.teachers import load_teacher


def test_run_zeroshot_probe__image_embeddings_at_their_class_prompts_score_one(tiny_clip):
    space = clip_space_of(load_teacher(tiny_clip), tiny_clip)
    classes = ["golden_retriever", "tabby cat", "red-panda", "ship", "truck", "frog", "horse"]
    text_CE = text_classifier(space, classes, TEMPLATES)
    assert text_CE.shape == (7, 32) and torch.allclose(text_CE.norm(dim=1), torch.ones(7))
    # summaries that the identity maps onto each class's prompt-ensemble embedding, in shuffled order
    identity = ClipSpace("identity", space.encode_text, lambda s: torch.nn.functional.normalize(s, dim=-1))
    order = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    metrics = run_zeroshot_probe(text_CE[order], order, space=identity, classes=classes)
    assert metrics == {"top1": 1.0, "top5": 1.0}


def test_clip_space_of__a_model_without_text_tower_is_refused(teacher_weights):
    teacher = load_teacher(f"timm:test_vit={teacher_weights['test_vit']}")
    with pytest.raises(ProbeError, match="no CLIP text tower"):
        clip_space_of(teacher, "timm:test_vit")


def _clip_student(student_dir, tiny_clip, tmp_path):
    """The session student, re-labelled as distilled from the tiny CLIP (its kept head `tiny_a` is 48-d, as is the
    tiny CLIP's trunk), so the student's CLIP-head path runs end to end."""
    folder = shutil.copytree(student_dir, tmp_path / "clip_student")
    meta = json.loads((folder / "unic.json").read_text())
    teacher = next(t for t in meta["teachers"] if t["alias"] == "tiny_a")
    teacher.update(source="open_clip", model_id="unic-tiny-clip", spec=tiny_clip)
    (folder / "unic.json").write_text(json.dumps(meta))
    return folder


def test_run_probe__zeroshot_for_a_clip_teacher_and_a_student_with_its_head(tmp_path, class_data, student_dir,
                                                                           tiny_clip):
    student = _clip_student(student_dir, tiny_clip, tmp_path)
    config = ProbeConfig.from_sources(None, {"models": (str(student), tiny_clip), "tasks": ("zeroshot",),
                                             "data_dir": class_data, "out_dir": tmp_path / "out", "num_workers": 0})
    results = run_probe(config).report["results"]
    for model in (str(student), tiny_clip):
        metrics = results[model]["zeroshot/cls"]
        assert set(metrics) == {"top1"} and 0.0 <= metrics["top1"] <= 1.0  # 3 classes: no top-5
    cached = sorted(p.name.split("-")[2] for p in (tmp_path / "out" / "cache").iterdir())
    assert "clip" in cached  # the student's teacher-space summaries are cached like any feature


def test_run_probe__zeroshot_without_train_split(tmp_path, class_data, tiny_clip):
    shutil.rmtree(class_data / "train")
    config = ProbeConfig.from_sources(None, {"models": (tiny_clip,), "tasks": ("zeroshot",), "data_dir": class_data,
                                             "out_dir": tmp_path / "out", "num_workers": 0})
    assert "zeroshot/cls" in run_probe(config).report["results"][tiny_clip]


def test_run_probe__random_init_zeroshot_of_a_student_is_refused(tmp_path, class_data, student_dir, tiny_clip):
    # its CLIP summaries come from the exported (trained) student and head: no random-init baseline exists
    student = _clip_student(student_dir, tiny_clip, tmp_path)
    config = ProbeConfig.from_sources(None, {"models": (str(student), tiny_clip), "tasks": ("zeroshot",),
                                             "data_dir": class_data, "out_dir": tmp_path / "out", "num_workers": 0,
                                             "random_init": True})
    with pytest.raises(ProbeError, match=r"--random-init --task zeroshot: student '.*clip_student' reaches the "
                                         r"CLIP space only through its trained encoder and head"):
        run_probe(config)
    assert not (tmp_path / "out" / "probe.json").exists()


def test_run_zeroshot_probe__warns_about_wordnet_ids_and_clashing_names(caplog):
    from unic_cli.probe.zeroshot import warn_about_class_names

    caplog.set_level("WARNING", logger="unic_cli")
    warn_about_class_names(["n01440764", "n01443537", "goldfish"])
    assert "2 of 3 look like WordNet ids (n01440764, n01443537)" in caplog.text
    caplog.clear()
    warn_about_class_names(["red_panda", "red-panda", "cat"])
    assert "['red_panda', 'red-panda'] read as the same words" in caplog.text
    caplog.clear()
    warn_about_class_names(["airplane", "golden_retriever"])
    assert not caplog.text


def test_run_zeroshot_probe__logit_scale_and_unnormalised_image_embeddings_do_not_change_the_ranking(tiny_clip):
    space = clip_space_of(load_teacher(tiny_clip), tiny_clip)
    classes = ["cat", "dog", "ship", "truck", "frog", "horse"]
    text_CE = text_classifier(space, classes)
    gen = torch.Generator().manual_seed(0)
    summary_MD = torch.randn(40, text_CE.shape[1], generator=gen)
    labels = (summary_MD @ text_CE.T).argmax(dim=1)  # the reference: raw dot products, no scale, no norm
    for scale in (1.0, 100.0):
        scaled = ClipSpace("scaled", space.encode_text, lambda s, scale=scale: scale * s)
        assert run_zeroshot_probe(summary_MD, labels, space=scaled, classes=classes)["top1"] == 1.0


def test_run_probe__a_students_recorded_clip_spec_runs_no_foreign_code(tmp_path, class_data, student_dir, tiny_clip):
    # A downloaded student's unic.json claims an open_clip head but records a py: spec: loading it would import and
    # run the module, so the probe refuses before anything loads (the module would write a marker file).
    evil = tmp_path / "evil.py"
    marker = tmp_path / "ran"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef build():\n    raise SystemExit\n")
    student = _clip_student(student_dir, tiny_clip, tmp_path)
    meta = json.loads((student / "unic.json").read_text())
    next(t for t in meta["teachers"] if t["alias"] == "tiny_a")["spec"] = f"py:{evil}:build"
    (student / "unic.json").write_text(json.dumps(meta))
    config = ProbeConfig.from_sources(None, {"models": (str(student),), "tasks": ("zeroshot",), "data_dir": class_data,
                                             "out_dir": tmp_path / "out", "num_workers": 0})
    with pytest.raises(ProbeError, match=r"names the CLIP teacher 'py:.*evil.py:build', which is not an open_clip"):
        run_probe(config)
    assert not marker.exists()
