"""PNG plots of a run from its metrics.jsonl: per-teacher losses (paper Fig. 3a) and coefficients (Fig. 4).

matplotlib is imported with the Agg backend inside the function, so plotting works on headless machines and
costs nothing to modules that never plot.
"""

from __future__ import annotations

import json
from pathlib import Path

from unic_cli.files import atomic_write


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `RUN/metrics.jsonl`, one dict per line, oldest first; [] when the run has none yet."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as f:  # a crash never leaves half a PNG under the final name
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """Write `losses.png` and `teacher_coefficients.png` into `run_dir`; returns the files written."""
    rows = read_metrics(run_dir)
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    keys = list(rows[-1]["teachers"])
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, key in enumerate(keys):
        name = rows[-1]["teachers"][key]["name"]
        color = f"C{i}"
        losses = [r["teachers"][key]["loss"] for r in rows]
        ax.plot(steps, [float("nan") if v is None else v for v in losses], color=color, label=f"{key} {name}")
        for kind, style in (("summary", ":"), ("patch", "--")):
            values = [r["teachers"][key][kind] for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], style, color=color,
                        alpha=0.6, label=f"{key} {kind}")
    ax.set(xlabel="step", ylabel="distillation loss", title="Per-teacher loss (UNIC Fig. 3a)")
    written.append(_save(fig, ax, Path(run_dir) / "losses.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, key in enumerate(keys):
        ax.plot(steps, [r["teachers"][key]["coeff"] for r in rows], color=f"C{i}",
                label=f"{key} {rows[-1]['teachers'][key]['name']}")
    ax.set(xlabel="step", ylabel="mean coefficient alpha_t", ylim=(0, 1.05),
           title="Teacher coefficients under teacher dropping (UNIC Fig. 4)")
    written.append(_save(fig, ax, Path(run_dir) / "teacher_coefficients.png"))
    return written
