"""probe.json merging, relative scores (Fig. 1), markdown and chart."""

from __future__ import annotations

import json

import pytest

from unic_cli.probe import report as rep


def _report(results: dict, kinds: dict, tasks=("knn/x", "depth/y")) -> dict:
    out = rep.empty_report()
    out["results"] = results
    out["models"] = {m: {"kind": k} for m, k in kinds.items()}
    info = {"knn/x": ("knn", "top1_k20", True), "depth/y": ("depth", "rmse", False)}
    for key in tasks:
        task, primary, higher = info[key]
        out["tasks"][key] = {"task": task, "data": f"/d/{key[-1]}", "split": "val", "primary": primary,
                             "higher_is_better": higher}
    return out


def test_relative_scores__against_the_best_teacher_with_lower_is_better_depth():
    report = _report({"s": {"knn/x": {"top1_k20": 0.9}, "depth/y": {"rmse": 0.5}},
                      "t1": {"knn/x": {"top1_k20": 0.8}, "depth/y": {"rmse": 1.0}},
                      "t2": {"knn/x": {"top1_k20": 0.6}, "depth/y": {"rmse": 0.4}}},
                     {"s": "student", "t1": "teacher", "t2": "teacher"})
    rel = rep.relative_scores(report)
    assert rel["knn/x"] == pytest.approx({"s": 12.5, "t1": 0.0, "t2": -25.0})
    assert rel["depth/y"] == pytest.approx({"s": -20.0, "t1": -60.0, "t2": 0.0})


def test_relative_scores__best_model_when_no_teacher_was_probed():
    report = _report({"a": {"knn/x": {"top1_k20": 0.5}}, "b": {"knn/x": {"top1_k20": 1.0}}},
                     {"a": "student", "b": "student"}, tasks=("knn/x",))
    assert rep.relative_scores(report)["knn/x"] == pytest.approx({"a": -50.0, "b": 0.0})


def test_write_report__merges_calls_and_writes_json_markdown_chart(tmp_path):
    first = _report({"s": {"knn/x": {"top1_k20": 0.9}}, "t": {"knn/x": {"top1_k20": 0.8}}},
                    {"s": "student", "t": "teacher"}, tasks=("knn/x",))
    second = _report({"s": {"depth/y": {"rmse": 0.5, "delta1": float("nan")}}}, {"s": "student"}, tasks=("depth/y",))
    rep.write_report(tmp_path, first)
    merged, files = rep.write_report(tmp_path, second)
    assert [f.name for f in files] == ["probe.json", "probe.md", "probe.png"]
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["results"]["s"] == {"knn/x": {"top1_k20": 0.9}, "depth/y": {"rmse": 0.5, "delta1": None}}
    assert {(r["model"], r["task"], r["score"]) for r in saved["rows"]} == {
        ("s", "knn", 0.9), ("t", "knn", 0.8), ("s", "depth", 0.5)}
    markdown = (tmp_path / "probe.md").read_text()
    assert "## knn/x" in markdown and "| s | student | 0.9000 | +12.5% |" in markdown
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report__replaces_its_files_never_writes_through_them(tmp_path):
    # each file goes through a temporary name and a rename: a crash leaves the old file, and a symlink planted at
    # probe.md / probe.png is replaced, not followed into the file it points to
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("probe.md", "probe.png"):
        (out / name).symlink_to(outside)
    rep.write_report(out, _report({"s": {"knn/x": {"top1_k20": 0.9}}}, {"s": "student"}, tasks=("knn/x",)))
    assert outside.read_text() == "keep me"
    assert not (out / "probe.md").is_symlink() and "## knn/x" in (out / "probe.md").read_text()
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["probe.json", "probe.md", "probe.png"]  # no temporaries


@pytest.mark.parametrize("data", [b"{broken", b'{"format": "other", "results": [1, 2]}', b"\xff\xfe not utf-8"])
def test_write_report__moves_an_unreadable_or_foreign_probe_json_aside(tmp_path, caplog, data):
    (tmp_path / "probe.json").write_bytes(data)
    (tmp_path / "probe.json.bak").write_text("an older backup")
    caplog.set_level("WARNING", logger="unic_cli")
    merged, _ = rep.write_report(tmp_path, _report({"s": {"knn/x": {"top1_k20": 0.9}}}, {"s": "student"},
                                                   tasks=("knn/x",)))
    assert (tmp_path / "probe.json.1.bak").read_bytes() == data  # the user's file, kept as it was
    assert (tmp_path / "probe.json.bak").read_text() == "an older backup"
    assert json.loads((tmp_path / "probe.json").read_text())["results"] == merged["results"] == {
        "s": {"knn/x": {"top1_k20": 0.9}}}
    assert f"{tmp_path / 'probe.json'} is not a readable" in caplog.text
    assert f"moved it to {tmp_path / 'probe.json.1.bak'}" in caplog.text


def test_merge__a_task_key_on_another_split_drops_the_other_models_results(caplog):
    base = _report({"s": {"knn/x": {"top1_k20": 0.9}}, "t": {"knn/x": {"top1_k20": 0.8}, "depth/y": {"rmse": 1.0}}},
                   {"s": "student", "t": "teacher"})
    new = _report({"s": {"knn/x": {"top1_k20": 0.7}}}, {"s": "student"}, tasks=("knn/x",))
    new["tasks"]["knn/x"]["split"] = "test"
    caplog.set_level("WARNING", logger="unic_cli")
    merged = rep.merge(base, new, where="p/probe.json")
    assert merged["results"] == {"s": {"knn/x": {"top1_k20": 0.7}}, "t": {"depth/y": {"rmse": 1.0}}}
    assert merged["tasks"]["knn/x"]["split"] == "test"
    assert "p/probe.json: knn/x now measures /d/x (test/), not /d/x (val/); dropped the old results of t" in caplog.text
    caplog.clear()
    assert rep.merge(merged, new)["results"] == merged["results"] and not caplog.text  # same data: nothing dropped


def test_relative_scores__an_undefined_gain_is_left_out_and_shown_as_n_a():
    # the only teacher scores 0: no percentage exists for the student (it used to show "+0.0%")
    report = _report({"s": {"knn/x": {"top1_k20": 0.4}, "depth/y": {"rmse": 0.0}},
                      "t": {"knn/x": {"top1_k20": 0.0}, "depth/y": {"rmse": 0.5}},
                      "u": {"knn/x": {"top1_k20": 0.0}, "depth/y": {"rmse": 0.5}}},
                     {"s": "student", "t": "teacher", "u": "teacher"})
    rel = rep.relative_scores(report)
    assert rel["knn/x"] == {"t": 0.0, "u": 0.0}  # equal to the reference: a gain of 0 is exact
    assert rel["depth/y"] == {"t": 0.0, "u": 0.0}  # an RMSE of 0 over a positive reference: no finite ratio
    markdown = rep.render_markdown(report)
    assert "| s | student | 0.4000 | n/a |" in markdown and "| s | student | 0.0000 | n/a |" in markdown
    assert "| t | teacher | 0.0000 | +0.0% |" in markdown


def test_relative_gain__direction_of_better():
    assert rep.relative_gain(0.9, 0.8, higher_is_better=True) == pytest.approx(12.5)
    assert rep.relative_gain(0.5, 0.4, higher_is_better=False) == pytest.approx(-20.0)  # a larger RMSE is worse
    assert rep.relative_gain(0.4, 0.5, higher_is_better=False) == pytest.approx(25.0)
    assert rep.relative_gain(0.3, 0.0, higher_is_better=True) is None
    assert rep.relative_gain(0.0, 0.0, higher_is_better=True) == 0.0
