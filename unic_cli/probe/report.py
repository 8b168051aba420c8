"""probe.json (merged across calls), probe.md, and the Fig. 1-style chart of each model relative to the best teacher.

probe.json layout (format "unic-probe", version 1)::

    {"format": "unic-probe", "format_version": 1, "unic_version": "0.1.0",
     "results": {MODEL: {TASK_KEY: {metric: value, ...}}},        # model -> task -> metrics
     "models":  {MODEL: {"kind": "student" | "teacher" | "baseline"}},  # baseline: random init
     "tasks":   {TASK_KEY: {"task": "knn", "data": "/abs/dataset", "split": "val",
                            "primary": "top1_k20", "higher_is_better": true}},
     "rows":    [{"model", "kind", "task", "data", "split", "metric", "score", ...}]}  # flat, for model cards

TASK_KEY is `task/dataset-folder-name` (e.g. `knn/hymenoptera`), so one file holds several datasets. A task key
measured again on other data (another folder of the same name, or another evaluation split) replaces the old
entry: the other models' results under it are dropped with a warning, so one table never mixes datasets.
A model probed with random weights is its own entry, `MODEL (random init)` of kind `baseline`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from unic_cli import __version__
from unic_cli.files import atomic_write

log = logging.getLogger("unic_cli")

FORMAT = "unic-probe"
FORMAT_VERSION = 1

# task -> (primary metric, higher is better); the paper reports depth as RMSE
PRIMARY: dict[str, tuple[str, bool]] = {
    "knn": ("top1_k{k}", True),
    "linear": ("top1", True),
    "seg": ("miou", True),
    "depth": ("rmse", False),
    "zeroshot": ("top1", True),
}


def empty_report() -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "unic_version": __version__, "results": {},
            "models": {}, "tasks": {}, "rows": []}


def random_init_name(model: str) -> str:
    """The probe.json key of MODEL probed with random weights (`--random-init`): a baseline next to MODEL."""
    return f"{model} (random init)"


def _parse(text: str) -> dict[str, Any] | None:
    try:
        report = json.loads(text)
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        return None
    if not all(isinstance(report.get(k), dict) for k in ("results", "models", "tasks")):
        return None
    return report


def read_report(path: Path) -> dict[str, Any]:
    """An earlier probe.json to merge into, or an empty report when there is none.

    A probe.json that is unreadable or not ours is never overwritten: it is moved to `probe.json.bak` (or
    `probe.json.1.bak`, `.2.bak`, ... when that exists) with a warning naming both paths, and an empty report
    is returned for the caller to write in its place.
    """
    if not path.is_file():
        return empty_report()
    try:
        report = _parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        report = None
    if report is not None:
        return report
    backup = path.with_name(path.name + ".bak")
    n = 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.{n}.bak")
    path.replace(backup)
    log.warning("%s is not a readable unic probe report; moved it to %s and writing a new one", path, backup)
    return empty_report()


def merge(base: dict[str, Any], new: dict[str, Any], *, where: str = "probe.json") -> dict[str, Any]:
    """`new` over `base`: a (model, task) measured again replaces the older numbers.

    A task key of `new` whose data folder or split differs from the one in `base` was measured on other data:
    the results of every model under that key in `base` are stale and dropped (a warning in the log names
    them and `where`, the file being updated).
    """
    out = empty_report()
    stale = {key for key, info in new["tasks"].items() if key in base["tasks"]
             and (base["tasks"][key].get("data"), base["tasks"][key].get("split")) != (info["data"], info["split"])}
    for key in sorted(stale):
        old, info = base["tasks"][key], new["tasks"][key]
        dropped = [m for m, tasks in base["results"].items() if key in tasks and key not in new["results"].get(m, {})]
        if dropped:
            log.warning("%s: %s now measures %s (%s/), not %s (%s/); dropped the old results of %s: probe them "
                        "again on this data, or use another --out to keep both", where, key, info["data"],
                        info["split"], old.get("data"), old.get("split"), ", ".join(dropped))
    for report in (base, new):
        for model, tasks in report["results"].items():
            kept = {k: v for k, v in tasks.items() if report is new or k not in stale}
            if kept or model in new["results"]:
                out["results"].setdefault(model, {}).update(kept)
                out["models"][model] = report["models"].get(model, out["models"].get(model, {}))
        out["tasks"].update(report["tasks"])
    out["rows"] = flat_rows(out)
    return out


def score(report: dict[str, Any], model: str, task_key: str) -> float | None:
    metrics = report["results"].get(model, {}).get(task_key)
    if not metrics:
        return None
    value = metrics.get(report["tasks"][task_key]["primary"])
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def flat_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (model, task): what the exported model card shows."""
    rows = []
    for task_key, info in report["tasks"].items():
        for model, tasks in report["results"].items():
            if task_key not in tasks:
                continue
            metrics = {k: v for k, v in tasks[task_key].items() if isinstance(v, (int, float, str))}
            rows.append({"model": model, "kind": report["models"].get(model, {}).get("kind", "teacher"),
                         "task": info["task"], "data": Path(info["data"]).name, "split": info["split"],
                         "metric": info["primary"], "score": score(report, model, task_key), **metrics})
    return rows


def best_reference(report: dict[str, Any]) -> dict[str, tuple[str, float, str]]:
    """task key -> (model, score, "teacher" or "model"): the best teacher on that task (the best model when no
    teacher was probed on it), the reference every gain is measured against."""
    out = {}
    for task_key, info in report["tasks"].items():
        scores = {m: s for m in report["results"] if (s := score(report, m, task_key)) is not None}
        teachers = {m: s for m, s in scores.items() if report["models"].get(m, {}).get("kind") == "teacher"}
        pool = teachers or scores
        if pool:
            pick = max if info["higher_is_better"] else min
            best = pick(pool, key=pool.__getitem__)
            out[task_key] = (best, pool[best], "teacher" if teachers else "model")
    return out


def relative_gain(value: float, best: float, *, higher_is_better: bool) -> float | None:
    """The gain (%) of `value` over the reference `best`; positive always means better.

    value / best - 1 when higher is better, best / value - 1 when lower is better (depth RMSE). None when the
    ratio is undefined (a reference of 0 for accuracy, or a score of 0 for RMSE) and the scores differ: no
    percentage is honest there, so the tables print "n/a". A score equal to the reference gains 0.
    """
    if value == best:
        return 0.0
    num, den = (value, best) if higher_is_better else (best, value)
    return 100.0 * (num / den - 1.0) if den > 0 else None


def relative_scores(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task key -> model -> relative gain (%) over the best teacher on that task (best model without teachers).

    See `relative_gain`; a model with a score but an undefined gain is left out (no gain is shown for it).
    """
    out = {}
    for task_key, (_, best, _) in best_reference(report).items():
        higher = report["tasks"][task_key]["higher_is_better"]
        rel = {}
        for model in report["results"]:
            if (value := score(report, model, task_key)) is None:
                continue
            if (gain := relative_gain(value, best, higher_is_better=higher)) is not None:
                rel[model] = gain
        out[task_key] = rel
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.4g}"
    return str(value)


def metric_columns(report: dict[str, Any], task_key: str) -> list[str]:
    """The numeric metrics of a task, primary first, in first-seen order."""
    primary = report["tasks"][task_key]["primary"]
    seen: list[str] = [primary]
    for tasks in report["results"].values():
        for name, value in tasks.get(task_key, {}).items():
            if name not in seen and isinstance(value, (int, float)) and not isinstance(value, bool):
                seen.append(name)
    return seen


def render_markdown(report: dict[str, Any]) -> str:
    """probe.md: one table per task, plus each model's gain over the best teacher."""
    relative, best = relative_scores(report), best_reference(report)
    lines = ["# unic probe", "", "Gain: the primary metric relative to the best teacher on that task (to the best "
             "model when no teacher was probed); positive means better; n/a where the best scores 0 (or a model "
             "scores an RMSE of 0), since no percentage is defined there.", ""]
    for task_key, info in report["tasks"].items():
        columns = metric_columns(report, task_key)
        lines += [f"## {task_key}", "", f"`{info['data']}`, evaluated on {info['split']}/; primary metric "
                  f"**{info['primary']}** ({'higher' if info['higher_is_better'] else 'lower'} is better).", ""]
        if task_key in best:
            model, value, what = best[task_key]
            lines += [f"Best {what}: `{model}` ({_fmt(value)}).", ""]
        lines.append("| model | kind | " + " | ".join(columns) + " | gain |")
        lines.append("|---|---|" + "---|" * (len(columns) + 1))
        for model, tasks in report["results"].items():
            if task_key not in tasks:
                continue
            kind = report["models"].get(model, {}).get("kind", "teacher")
            cells = [_fmt(tasks[task_key].get(c, "")) for c in columns]
            gain = relative.get(task_key, {}).get(model)
            if gain is not None:
                shown = f"{gain:+.1f}%"
            else:  # a score whose gain is undefined (reference 0): say so instead of a made-up +0.0%
                shown = "n/a" if score(report, model, task_key) is not None and task_key in best else ""
            lines.append(f"| {model} | {kind} | " + " | ".join(cells) + f" | {shown} |")
        lines.append("")
    return "\n".join(lines)


def plot_chart(report: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars: each model's relative gain (%) over the best teacher, per task (UNIC paper, Fig. 1)."""
    relative = relative_scores(report)
    if not relative:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    tasks = list(relative)
    models = list(report["results"])
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(tasks) * max(1, len(models)) ** 0.5 + 2), 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        xs = [t + (i - (len(models) - 1) / 2) * width for t in range(len(tasks))]
        ys = [relative[task].get(model, math.nan) for task in tasks]
        kind = report["models"].get(model, {}).get("kind", "teacher")
        bars = ax.bar(xs, [0 if math.isnan(y) else y for y in ys], width, label=f"{model} ({kind})",
                      color=colours[i % len(colours)], hatch={"student": None, "baseline": ".."}.get(kind, "//"),
                      edgecolor="black", linewidth=0.5)
        for bar, y in zip(bars, ys):
            if not math.isnan(y):
                ax.annotate(f"{y:+.1f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({report['tasks'][t]['primary']})" for t in tasks], fontsize=8)
    has_teacher = any(m.get("kind") == "teacher" for m in report["models"].values())
    ax.set_ylabel(f"relative gain over the best {'teacher' if has_teacher else 'model'} (%)")
    ax.set_title("unic probe: each model vs the best teacher per task")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def _finite(value: Any) -> Any:
    """NaN and infinity are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")


def write_report(out_dir: Path, new: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    """Merge `new` into OUT/probe.json and rewrite probe.json, probe.md and probe.png from the merged report."""
    merged = merge(read_report(out_dir / "probe.json"), new, where=str(out_dir / "probe.json"))
    write_json(out_dir / "probe.json", merged)
    with atomic_write(out_dir / "probe.md", "w", encoding="utf-8") as f:
        f.write(render_markdown(merged))
    files = [out_dir / "probe.json", out_dir / "probe.md"]
    chart = plot_chart(merged, out_dir / "probe.png")
    if chart is not None:
        files.append(chart)
    return merged, files
