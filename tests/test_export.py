"""Export: projector-free folder, timm/HF round trips, kept heads, provenance, bad inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from unic_cli import export as export_mod
from unic_cli.errors import CheckpointError, ExportError, ExportVerificationError
from unic_cli.export import export_student, load_student


def _checkpoint_student(ckpt_path):
    """The training-side view of the checkpoint's student: unic_cli.student.Student over its timm model."""
    import timm

    from unic_cli.student import Student

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    s = ckpt["student"]
    model = timm.create_model(s["name"], pretrained=False, **s["model_args"])
    model.load_state_dict(s["state_dict"])
    return Student(model.eval(), name=s["name"], model_args=s["model_args"]), ckpt


def _images(size: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _split(student, tokens_BLD):
    """forward_features output -> (summary_BD, patch_BND) with the training student's semantics."""
    patch_BND = tokens_BLD[:, student.num_prefix_tokens:]
    summary_BD = tokens_BLD[:, 0] if student.has_cls_token else patch_BND.mean(dim=1)
    return summary_BD, patch_BND


@pytest.fixture
def exported(tmp_path, make_unic_checkpoint):
    ckpt = make_unic_checkpoint()
    out = export_student(ckpt.parent.parent, tmp_path / "student", keep_heads=("tiny_a", "tiny_nc"))
    return ckpt, out


def test_export_student__writes_only_encoder_weights_and_is_smaller(exported):
    ckpt_path, out = exported
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(ckpt["student"]["state_dict"])  # the timm encoder's keys, nothing else
    assert not [k for k in keys if k.startswith(("heads", "ladder", "standardizers", "optimizer", "head."))]
    assert (out / "model.safetensors").stat().st_size < ckpt_path.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "heads.safetensors", "model.safetensors", "unic.json"]


def test_export_student__timm_config_layout(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == 0 and config["num_features"] == 64
    assert config["model_args"]["img_size"] == 64 and "num_classes" not in config["model_args"]
    assert not [k for k in config["model_args"] if "drop" in k]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 64, 64] and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "center"


@pytest.mark.parametrize("student", ["test_vit", "test_vit2"])  # test_vit2: registers, no class token
def test_export_student__timm_local_dir_reproduces_checkpoint_tokens(tmp_path, make_unic_checkpoint, student):
    import timm
    from timm.data import create_transform, resolve_data_config

    ckpt_path = make_unic_checkpoint(student=student, blocks=(5,))
    out = export_student(ckpt_path, tmp_path / "student")
    trained, _ = _checkpoint_student(ckpt_path)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = trained.normalize(_images(64))
    with torch.no_grad():
        [(want_summary, want_patch)] = trained(x, blocks=[trained.num_blocks - 1])
        got_summary, got_patch = _split(trained, loaded.forward_features(x))
    assert (want_summary - got_summary).abs().max() < 1e-5 and (want_patch - got_patch).abs().max() < 1e-5
    assert loaded.num_classes == 0 and loaded.num_reg_tokens == trained.model.num_reg_tokens

    data = resolve_data_config({}, model=loaded)
    assert tuple(data["input_size"]) == (3, 64, 64) and tuple(data["mean"]) == trained.mean
    assert data["interpolation"] == "bicubic" and data["crop_pct"] == 1.0
    assert "Resize(size=64" in str(create_transform(**data))

    fresh = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5)
    assert fresh.head.out_features == 5
    assert torch.equal(fresh.patch_embed.proj.weight, loaded.patch_embed.proj.weight)


def test_export_student__hf_automodel_reproduces_checkpoint_tokens(exported):
    from transformers import AutoModel

    ckpt_path, out = exported
    trained, _ = _checkpoint_student(ckpt_path)
    hf_model = AutoModel.from_pretrained(str(out)).eval()
    assert type(hf_model).__name__ == "TimmWrapperModel"
    x = trained.normalize(_images(64))
    with torch.no_grad():
        [(want_summary, want_patch)] = trained(x, blocks=[trained.num_blocks - 1])
        got_summary, got_patch = _split(trained, hf_model(pixel_values=x).last_hidden_state)
    assert (want_summary - got_summary).abs().max() < 1e-5 and (want_patch - got_patch).abs().max() < 1e-5


@pytest.mark.parametrize("shared_heads", [False, True])
def test_load_student__heads_equal_the_ladder_unstandardised(tmp_path, make_unic_checkpoint, shared_heads):
    from unic_cli.ladder import LadderProjector

    ckpt_path = make_unic_checkpoint(shared_heads=shared_heads)
    keep = ("tiny_a", "tiny_nc")
    student = load_student(export_student(ckpt_path, tmp_path / "student", keep_heads=keep))
    trained, ckpt = _checkpoint_student(ckpt_path)
    meta = ckpt["ladder_meta"]
    dims = [(c["summary_dim"] if "summary" in c["tokens"] else None, c["patch_dim"]) for c in ckpt["teachers"]]
    ladder = LadderProjector(in_dim=64, teacher_dims=dims, blocks=meta["blocks"], num_blocks=6,
                             shared_heads=meta["shared_heads"], hidden_dim=meta["hidden_dim"],
                             last_hidden_dim=meta["last_hidden_dim"])
    ladder.load_state_dict(ckpt["ladder"])
    images = _images(64)
    with torch.no_grad():
        preds = ladder(trained(trained.normalize(images), blocks=meta["blocks"]))
    assert set(student.heads) == set(keep)
    for i, alias in enumerate(keep):
        got = student.heads[alias](images)
        for kind in ("summary", "patch"):
            if kind not in preds[i]:
                assert getattr(got, f"{kind}_{'BD' if kind == 'summary' else 'BND'}") is None
                continue
            mean_D = ckpt["standardizers"][f"t{i}.{kind}.mean_D"]
            var_D = ckpt["standardizers"][f"t{i}.{kind}.var_D"]
            want = preds[i][kind] * torch.sqrt(var_D + meta["std_eps"]) + mean_D
            have = got.summary_BD if kind == "summary" else got.patch_BND
            assert (want - have).abs().max() < 1e-4


def test_load_student__transform_encode_and_card(exported):
    from PIL import Image

    _, out = exported
    student = load_student(out)
    image = Image.fromarray(_images(100, n=1)[0].permute(1, 2, 0).numpy())
    x = student.transform(image)[None]
    assert x.shape == (1, 3, 64, 64)
    summary_BD, patch_BND = student.encode(x)
    assert summary_BD.shape == (1, 64) and patch_BND.shape == (1, 16, 64)
    assert student.encode(_images(64))[1].shape == (3, 16, 64)  # uint8 is normalised inside
    assert student.card["step"] == 7 and [t["alias"] for t in student.card["teachers"]] == ["tiny_a", "tiny_nc"]


def test_export_student__provenance_and_model_card(tmp_path, make_unic_checkpoint):
    ckpt_path = make_unic_checkpoint()
    run = ckpt_path.parent.parent
    (run / "probe.json").write_text(json.dumps([{"model": "student", "task": "knn", "top1": 0.8125}]))
    out = export_student(run, tmp_path / "student")
    info = json.loads((out / "unic.json").read_text())
    assert info["license"]["non_commercial"] is True and info["license"]["non_commercial_teachers"] == ["tiny_nc"]
    assert info["license"]["licenses"] == ["apache-2.0", "cc-by-nc-4.0"]
    assert [(t["alias"], t["model_id"], t["spec"]) for t in info["teachers"]] == [
        ("tiny_a", "test_vit", "tiny_a"), ("tiny_nc", "test_vit", "tiny_nc")]
    assert info["step"] == 7 and info["config"]["lr"] == 1e-3 and info["unic_version"]
    assert len(info["source_checkpoint"]["sha256"]) == 64 and info["verification"]["max_abs_diff"] <= 1e-5
    assert info["heads"] is None
    card = (out / "README.md").read_text()
    assert "NON-COMMERCIAL" in card and 'timm.create_model("local-dir:' in card and "AutoModel" in card
    assert "| student | knn | 0.8125 |" in card and "| tiny_nc | timm | test_vit | cc-by-nc-4.0 |" in card
    assert "## Probe report (measured on the run's exports)" in card and "exports (student)" in card
    assert "https://arxiv.org/abs/2408.17064" in card and "2407.21064" not in card  # the UNIC paper


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe not utf-8"])
def test_export_student__unreadable_probe_report_is_ignored_with_a_warning(tmp_path, make_unic_checkpoint, caplog,
                                                                            content):
    run = make_unic_checkpoint().parent.parent
    (run / "probe.json").write_bytes(content)
    with caplog.at_level("WARNING", logger="unic_cli"):
        card = (export_student(run, tmp_path / "student") / "README.md").read_text()
    assert "ignoring unreadable probe report" in caplog.text and "## Probe report" not in card


def _set_schedule(ckpt_path, *, step: int, total_steps: int):
    """Rewrite a hand-made checkpoint's step and scheduler as `unic distill` records them."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["step"], ckpt["scheduler"] = step, {"step": step, "total_steps": total_steps}
    torch.save(ckpt, ckpt_path)
    return ckpt_path


# cls / avg + fc_norm (timm's layout: a run from before unic moved the norm) / avg, the norm before pooling (what
# unic distill builds for test_vit2 now) / map pooling
@pytest.mark.parametrize("student", ["test_vit", "test_vit2", "test_vit2:fc_norm=False", "test_vit3"])
def test_export_student__pooled_output_is_the_distilled_summary(tmp_path, make_unic_checkpoint, student):
    import timm
    from transformers import AutoModel

    student, norm_before_pool = student.split(":")[0], student.endswith("fc_norm=False")
    ckpt_path = make_unic_checkpoint(student=student, image_size=32, blocks=(1,),
                                     student_args={"fc_norm": False} if norm_before_pool else None)
    out = export_student(ckpt_path, tmp_path / "student")
    trained, ckpt = _checkpoint_student(ckpt_path)
    images = _images(32, n=4)
    summary_BD, _ = load_student(out).encode(images)
    x = trained.normalize(images)
    hf_model, loading = AutoModel.from_pretrained(str(out), output_loading_info=True)
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    card = (out / "README.md").read_text()
    call = card[card.index("plain = timm.create_model("):].split("\n```")[0].replace("PATH/TO/THIS/FOLDER", str(out))
    namespace = {"timm": timm}
    exec(call, namespace)  # the model card's plain-timm line, as written
    with torch.no_grad():
        [(train_summary_BD, _)] = trained(x, blocks=[trained.num_blocks - 1])  # what distillation trained
        untouched = export_mod.build_encoder(ckpt["student"])(x)  # the student's own pooling, as built
        pooled = {"timm": plain(x), "hf": hf_model.eval()(pixel_values=x).pooler_output,
                  "card": namespace["plain"].eval()(x)}
    assert (summary_BD - train_summary_BD).abs().max() < 1e-6
    for name, pooled_BD in pooled.items():
        assert (pooled_BD - summary_BD).abs().max() < 1e-6, name
    assert not any(loading.values()), loading  # transformers loaded every tensor, nothing missing or unexpected
    if student != "test_vit" and not norm_before_pool:  # the untrained fc_norm / attention pool would differ
        assert (untouched - summary_BD).abs().max() > 1e-2

    dropped = {"test_vit": [], "test_vit2": [] if norm_before_pool else ["fc_norm"], "test_vit3": ["attn_pool"]}[student]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert keys == {k for k in ckpt["student"]["state_dict"] if k.split(".")[0] not in dropped}
    info = json.loads((out / "unic.json").read_text())
    assert info["student"]["untrained_modules_dropped"] == dropped
    assert info["verification"]["pooled_max_abs_diff"] <= 1e-5
    args = json.loads((out / "config.json").read_text())["model_args"]
    assert args["global_pool"] == ("token" if student == "test_vit" else "avg") and args["fc_norm"] is False
    # timm's test_vit2 layout: the taps skip a norm, none is exported; with the norm before pooling it is kept
    assert args.get("final_norm", True) is (student != "test_vit2" or norm_before_pool)


def test_export_student__plain_timm_without_model_args_resamples(tmp_path, make_unic_checkpoint):
    """Why the card and docs/export.md spell out model_args: without img_size timm silently resamples pos_embed."""
    import timm

    out = export_student(make_unic_checkpoint(image_size=32, blocks=(1,)), tmp_path / "student")
    config = json.loads((out / "config.json").read_text())
    overlay = dict(config["pretrained_cfg"], file=str(out / "model.safetensors"))
    bare = timm.create_model("test_vit", pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    exact = timm.create_model(config["architecture"], pretrained=True, num_classes=0, **config["model_args"],
                              pretrained_cfg_overlay=overlay)  # the recipe of docs/export.md "Loading it"
    assert bare.pos_embed.shape != exact.pos_embed.shape  # loaded without an error all the same
    student = load_student(out)
    x = student.preprocess(_images(32))
    with torch.no_grad():
        assert (exact.eval()(x) - student.encode(x)[0]).abs().max() < 1e-6


def test_export_student__unfinished_run_warns_and_says_so(tmp_path, make_unic_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("unic_cli"), "propagate", True)  # the CLI turns it off for rich
    caplog.set_level(logging.INFO, logger="unic_cli")
    ckpt_path = _set_schedule(make_unic_checkpoint(), step=30, total_steps=400)
    out = export_student(ckpt_path, tmp_path / "early")
    # one warning (the CLI test checks it is printed once; here an earlier in-process CLI test may have added a
    # second handler that captures the same record again)
    warnings = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert len(warnings) == 1 and "at step 30 of 400: the run has not finished" in next(iter(warnings))
    assert "\n" not in next(iter(warnings))
    info = json.loads((out / "unic.json").read_text())
    assert (info["step"], info["total_steps"], info["finished"]) == (30, 400, False)
    assert "step 30 of 400 (unfinished run)." in (out / "README.md").read_text()

    caplog.clear()
    out = export_student(_set_schedule(ckpt_path, step=400, total_steps=400), tmp_path / "final")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    info = json.loads((out / "unic.json").read_text())
    assert (info["total_steps"], info["finished"]) == (400, True)
    card = (out / "README.md").read_text()
    assert "step 400 of 400." in card and "unfinished" not in card


def _probe_report(entries):
    """A probe.json in unic probe's format: entries = [(model, kind, model entry extras, top1)]."""
    from unic_cli.probe import report as report_lib

    report = report_lib.empty_report()
    report["tasks"]["knn/hs"] = {"task": "knn", "data": "/data/hs", "split": "val", "primary": "top1_k20",
                                 "higher_is_better": True}
    for model, kind, extra, top1 in entries:
        report["models"][model] = {"kind": kind, **extra}
        report["results"][model] = {"knn/hs": {"top1_k20": top1}}
    report["rows"] = report_lib.flat_rows(report)
    return report


def test_export_student__card_keeps_only_this_exports_probe_rows(tmp_path, make_unic_checkpoint):
    ckpt_path = make_unic_checkpoint()
    run = ckpt_path.parent.parent
    sha = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    (run / "probe.json").write_text(json.dumps(_probe_report([
        ("students/step6", "student", {"source_checkpoint": {"sha256": "0" * 64}}, 0.5),
        ("students/last", "student", {"source_checkpoint": {"sha256": sha}}, 0.625),
        ("tiny_a", "teacher", {}, 0.75),
        ("students/last (random init)", "baseline", {"random_init_of": "student", "seed": 0}, 0.25),
    ])))
    card = (export_student(run, tmp_path / "student") / "README.md").read_text()
    section = card[card.index("## Probe report"):card.index("## Provenance")]
    assert "| students/last | student | knn | hs | val | top1_k20 | 0.625 |" in section
    assert "| tiny_a | teacher |" in section and "| students/step6 |" not in section
    assert "Measured on this export (probed as students/last; its source checkpoint sha256 matches)" in section
    assert "Left out: results of other exports or steps (students/step6); random-init baselines " \
           "(students/last (random init))." in section and "| baseline |" not in section

    # a probe.json that does not say which checkpoint a student came from: every row, clearly labelled
    (run / "probe.json").write_text(json.dumps(_probe_report([
        ("students/step6", "student", {}, 0.5), ("tiny_a", "teacher", {}, 0.75)])))
    card = (export_student(run, tmp_path / "student", overwrite=True) / "README.md").read_text()
    assert "## Probe report (measured on the run's exports)" in card
    assert "the run's exports (students/step6), not necessarily on this checkpoint" in card
    assert "| students/step6 | student |" in card


def test_licence_summary__commercial_teachers_only():
    cards = [{"alias": "a", "license": "apache-2.0"}, {"alias": "b", "license": "mit"}]
    assert export_mod._licence_summary(cards)["non_commercial"] is False
    assert export_mod._licence_summary([{"alias": "c", "license": "CC-BY-NC-SA-4.0"}])["non_commercial"] is True


def test_export_student__run_folder_takes_the_latest_step(tmp_path, make_unic_checkpoint):
    ckpts = tmp_path / "run" / "checkpoints"
    make_unic_checkpoint(ckpts / "step_0000003.pt")
    make_unic_checkpoint(ckpts / "step_0000012.pt", seed=1)
    assert export_mod.find_checkpoint(tmp_path / "run") == ckpts / "step_0000012.pt"
    out = export_student(ckpts / "step_0000003.pt", tmp_path / "early")  # an intermediate checkpoint
    assert json.loads((out / "unic.json").read_text())["source_checkpoint"]["path"].endswith("step_0000003.pt")


def test_export_student__refuses_to_overwrite_unless_asked(exported):
    ckpt_path, out = exported
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_student(ckpt_path, out)
    export_student(ckpt_path, out, overwrite=True)
    assert not (out / "heads.safetensors").exists()  # replaced, not merged
    with pytest.raises(ExportError, match="not a unic export"):
        export_student(ckpt_path, ckpt_path.parent, overwrite=True)  # never deletes an unrelated folder


def test_export_student__provenance_is_of_the_weights_read_while_the_run_moves_on(tmp_path, make_unic_checkpoint,
                                                                                   monkeypatch):
    """A run still training replaces last.pt between the export's reads: sha256, step and path must all be of
    the checkpoint whose weights were exported (they were of last.pt's next version)."""
    import os

    ckpts = tmp_path / "run" / "checkpoints"
    first = _set_schedule(make_unic_checkpoint(ckpts / "step_0000003.pt"), step=3, total_steps=12)
    later = _set_schedule(make_unic_checkpoint(ckpts / "step_0000012.pt", seed=1), step=12, total_steps=12)
    os.link(first, ckpts / "last.pt")  # as unic distill links last.pt to the newest step
    build_encoder = export_mod.build_encoder

    def build_then_save_the_next_checkpoint(student):
        os.link(later, ckpts / ".last.pt.tmp")  # unic distill's next save_checkpoint, mid-export
        os.replace(ckpts / ".last.pt.tmp", ckpts / "last.pt")
        return build_encoder(student)

    monkeypatch.setattr(export_mod, "build_encoder", build_then_save_the_next_checkpoint)
    out = export_student(tmp_path / "run", tmp_path / "student")
    info = json.loads((out / "unic.json").read_text())
    assert info["step"] == 3
    assert info["source_checkpoint"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert info["source_checkpoint"]["path"] == str(first.resolve())  # not last.pt, which has moved on
    want = torch.load(first, weights_only=True)["student"]["state_dict"]["patch_embed.proj.weight"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("patch_embed.proj.weight"), want)


def test_export_student__folder_is_readable_like_any_new_folder(tmp_path, make_unic_checkpoint):
    import os
    import stat

    old_umask = os.umask(0o022)
    try:
        out = export_student(make_unic_checkpoint(), tmp_path / "student", keep_heads=("tiny_a",))
        out = export_student(make_unic_checkpoint(), out, keep_heads=("tiny_a",), overwrite=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # mkdtemp alone gives 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(["README.md", "config.json", "heads.safetensors", "model.safetensors",
                                   "unic.json"], 0o644)  # safetensors alone writes 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name != "run"] == ["student"]  # no temporary or old folder


@pytest.mark.parametrize("kind", ["missing", "random_pt", "text", "folder_without_checkpoint"])
def test_export_student__bad_source_is_a_clear_checkpoint_error(tmp_path, kind):
    source = tmp_path / "x.pt"
    if kind == "random_pt":
        torch.save({"model": torch.zeros(2)}, source)
    elif kind == "text":
        source.write_text("hello")
    elif kind == "folder_without_checkpoint":
        source = tmp_path / "run"
        source.mkdir()
    with pytest.raises(CheckpointError) as err:
        export_student(source, tmp_path / "out")
    assert str(source) in str(err.value) and err.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_export_student__unknown_keep_heads_alias_suggests_close_names(tmp_path, make_unic_checkpoint):
    with pytest.raises(ExportError, match="Did you mean 'tiny_a'"):
        export_student(make_unic_checkpoint(), tmp_path / "out", keep_heads=("tiny_aa",))
    assert not (tmp_path / "out").exists()


def test_export_student__failed_verification_writes_nothing(tmp_path, make_unic_checkpoint, monkeypatch):
    monkeypatch.setattr(export_mod, "VERIFY_ATOL", -1.0)  # no difference can pass: the failure path runs
    with pytest.raises(ExportVerificationError, match="does not reproduce") as err:
        export_student(make_unic_checkpoint(), tmp_path / "out")
    assert err.value.exit_code == 1 and list(tmp_path.glob("*out*")) == []


def test_unic_cli__public_api_is_lazy():
    code = ("import sys, unic_cli; assert 'torch' not in sys.modules; "
            "from unic_cli import export_student, load_student; print(callable(load_student))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------------------------------------------------------
# A real short CPU distillation (two tiny random timm teachers, real images) -> export -> reload.

_TINY_CARD = """source = "timm"
model_id = "test_vit"
image_size = 64
patch_size = 16
summary_dim = 64
patch_dim = 64
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
license = "{license}"
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shared_data):
    """40 distill steps of test_vit at 64 px from two random test_vit teachers, on hymenoptera/train.

    Yields (run folder, export folder, the training's teachers rebuilt exactly). The teachers are random
    inits, so they are rebuilt by replaying `distill.run`'s seeded construction order; a wrong rebuild would
    show as a cosine distance near 1 in the held-out test below.
    """
    from unic_cli import registry
    from unic_cli.config import DistillConfig
    from unic_cli.data import build_train_loader
    from unic_cli.distill import run
    from unic_cli.plan import build_teachers
    from unic_cli.student import build_student

    root = tmp_path_factory.mktemp("real_run")
    cards = root / "cards"
    cards.mkdir()
    (cards / "xtiny_a.toml").write_text(_TINY_CARD.format(license="apache-2.0"))
    (cards / "xtiny_nc.toml").write_text(_TINY_CARD.format(license="cc-by-nc-4.0"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_user_dirs", [cards])  # session-global registry state: restored on exit
        registry.all_cards.cache_clear()
        config = DistillConfig.from_sources(None, {
            "teachers": ("xtiny_a", "xtiny_nc"), "data_dir": shared_data / "hymenoptera" / "train",
            "out_dir": root / "run", "student": "test_vit", "image_size": 64, "batch_size": 16, "steps": 40,
            "base_lr": 3e-3, "drop_path_rate": 0.0, "teacher_drop_prob": 0.0, "num_workers": 0, "device": "cpu",
            "random_init_teachers": True, "log_every": 10, "checkpoint_every": 20})
        run(config)
        torch.manual_seed(config.seed)  # replay run(): seed, loader, student, then teachers
        build_train_loader(config.data_dir, image_size=config.image_size, batch_size=config.batch_size,
                           num_workers=config.num_workers, seed=config.seed, augment=config.augment)
        student = build_student(config.student, image_size=config.image_size, drop_path_rate=config.drop_path_rate)
        teachers = build_teachers(config, student.grid, "cpu")
        out = export_student(config.out_dir, root / "student", keep_heads=("xtiny_a", "xtiny_nc"))
        yield config.out_dir, out, teachers
    registry.all_cards.cache_clear()


def _heldout_images(shared_data, n: int = 32) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted((shared_data / "hymenoptera" / "val").rglob("*.jp*g"))[:n]
    arrays = [np.array(Image.open(f).convert("RGB").resize((64, 64), Image.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# about 8 s on 2 idle cores (a 40-step distillation on the real hymenoptera images)
def test_export_student__real_run_round_trips_through_timm_and_transformers(real_run, shared_data):
    import timm
    from transformers import AutoModel

    run_dir, out, _ = real_run
    trained, ckpt = _checkpoint_student(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 40
    x = trained.normalize(_heldout_images(shared_data, n=4))
    with torch.no_grad():
        [(want_summary, want_patch)] = trained(x, blocks=[trained.num_blocks - 1])
        for tokens_BLD in (timm.create_model(f"local-dir:{out}", pretrained=True).eval().forward_features(x),
                           AutoModel.from_pretrained(str(out)).eval()(pixel_values=x).last_hidden_state):
            got_summary, got_patch = _split(trained, tokens_BLD)
            assert (want_summary - got_summary).abs().max() < 1e-5
            assert (want_patch - got_patch).abs().max() < 1e-5
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == sorted(trained.model.state_dict())
    assert (out / "model.safetensors").stat().st_size < (run_dir / "checkpoints" / "last.pt").stat().st_size
    assert json.loads((out / "unic.json").read_text())["finished"] is True
    early = export_student(run_dir / "checkpoints" / "step_0000020.pt", out.parent / "early")
    info = json.loads((early / "unic.json").read_text())
    assert (info["step"], info["total_steps"], info["finished"]) == (20, 40, False)
    assert "step 20 of 40 (unfinished run)" in (early / "README.md").read_text()


# about 8 s on 2 idle cores (a 40-step distillation on the real hymenoptera images)
def test_load_student__real_heads_match_training_cosine_on_heldout_images(real_run, shared_data):
    run_dir, out, teachers = real_run
    student = load_student(out)
    reported = student.card["last_metrics"]["teachers"]
    images = _heldout_images(shared_data)
    for i, alias in enumerate(("xtiny_a", "xtiny_nc")):
        head = student.heads[alias]
        pred, target = head(images), teachers[i](images)
        pairs = (("summary", pred.summary_BD, target.summary_BD), ("patch", pred.patch_BND, target.patch_BND))
        for kind, p, t in pairs:
            # Training reports 1 - cos between the prediction and the standardised target; the head returns
            # un-standardised features, so standardise both with the exported statistics to compare like for like.
            mean_D, var_D = getattr(head, f"{kind}_mean_D"), getattr(head, f"{kind}_var_D")
            std = lambda y: (y - mean_D) / torch.sqrt(var_D + head.eps)  # noqa: E731
            heldout = 1 - torch.nn.functional.cosine_similarity(std(p), std(t), dim=-1).mean().item()
            assert abs(heldout - reported[f"t{i}"][f"{kind}_cos"]) < 0.08, (alias, kind, heldout, reported)
            assert heldout < 0.6  # far from a random mapping (about 1)
