"""A study's tables and plots, made from its finished cells.

- ``results.csv``: one row per cell and metric (``msa``, ``dice``, ``iou``; ``ais`` filled on ``msa`` rows), with
  the cell's trainable parameters, time per iteration, peak memory and wall time: ``pandas.read_csv`` or
  ``datasets.load_dataset("csv", data_files=...)`` read it as is.
- ``results.md``: the paper's layout (Tab. 1/2: methods as rows, datasets × prompt modes as columns, each
  dataset scored by its own metric: mSA for instance sets, Dice for semantic ones), the resource table
  (trainable parameters, time per iteration, peak memory), and one table per ablated method.
- ``scores.png`` (grouped bars per dataset), ``score_vs_parameters.png``, ``score_vs_time.png``.

Scores of several seeds are averaged (``±`` their standard deviation in the Markdown).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from .cell import RESULT_NAME
from .spec import StudySpec

__all__ = ["CSV_COLUMNS", "collect_records", "long_rows", "markdown_report", "write_reports"]

MODES = ("point", "box", "ip", "ib")
MODE_TITLES = {"point": "Point", "box": "Box", "ip": "I_P", "ib": "I_B", "ais": "AIS"}
CSV_COLUMNS = (
    "study", "cell_id", "dataset", "method", "ablation", "seed", "metric", "point", "box", "ip", "ib", "ais",
    "trainable_parameters", "time_per_iteration_s", "peak_memory_gib", "wall_s", "steps", "best_is_base",
    "n_images", "n_objects",
)


def collect_records(spec: StudySpec, folder: Path) -> list[dict[str, Any]]:
    """The results of the study's finished cells, in grid order."""
    from ..hub.provenance import read_json_file

    records = []
    for cell in spec.cells():
        path = folder / "cells" / cell.cell_id / RESULT_NAME
        if path.is_file():
            record = read_json_file(path)  # damaged: one line naming the file and the line
            record["ablation_label"] = cell.ablation_label
            records.append(record)
    return records


def long_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell and metric (the CSV)."""
    rows = []
    for record in records:
        for metric, scores in record["scores"].items():
            ais = record.get("ais")
            rows.append({
                "study": record["study"], "cell_id": record["cell_id"], "dataset": record["dataset"],
                "method": record["method"], "ablation": record.get("ablation_label", ""), "seed": record["seed"],
                "metric": metric, **{mode: scores.get(mode) for mode in MODES},
                "ais": ais["msa"] if ais and metric == "msa" else None,
                **{key: record.get(key) for key in CSV_COLUMNS[12:]},
            })
    return rows


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _score(record: dict[str, Any], mode: str) -> float | None:
    if mode == "ais":
        return (record.get("ais") or {}).get("msa")
    return record["scores"][record["table_metric"]].get(mode)


def _grouped(records: Sequence[dict[str, Any]], ablation: bool) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(method, ablation label, dataset) -> records of its seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        label = record.get("ablation_label", "")
        if bool(label) == ablation:
            groups[(record["method"], label, record["dataset"])].append(record)
    return groups


def _datasets(records: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["dataset"] for r in records))


def _modes(records: Sequence[dict[str, Any]], dataset: str) -> list[str]:
    has_ais = any(r.get("ais") for r in records if r["dataset"] == dataset)
    return [*MODES, "ais"] if has_ais else list(MODES)


def _score_table(records: Sequence[dict[str, Any]], ablation: bool, row_title: str) -> list[str]:
    groups = _grouped(records, ablation)
    datasets = _datasets(records)
    columns = [(d, m) for d in datasets for m in _modes(records, d)]
    metric_of = {r["dataset"]: r["table_metric"] for r in records}
    header = [row_title] + [f"{d} {MODE_TITLES[m]} ({'mSA' if m == 'ais' or metric_of[d] == 'msa' else 'Dice'})"
                            for d, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    row_keys = list(dict.fromkeys((method, label) for method, label, _ in groups))
    for method, label in row_keys:
        cells = []
        for dataset, mode in columns:
            values = [_score(r, mode) for r in groups.get((method, label, dataset), [])]
            cells.append(_fmt(*_mean_std(values)))
        name = f"{method} ({label})" if label else method
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def _resource_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per method (default cells, all datasets and seeds): trainable parameters, time per iteration, peak memory."""
    lines = [
        "| method | trainable parameters | time / iteration (s) | peak memory (GiB) | steps | wall time per cell (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if not record.get("ablation_label"):
            by_method[record["method"]].append(record)
    for method, group in by_method.items():
        params = group[0]["trainable_parameters"]
        time_it = _mean_std([r.get("time_per_iteration_s") for r in group])
        memory = _mean_std([r.get("peak_memory_gib") for r in group])
        steps = _mean_std([r.get("steps") for r in group])[0]
        wall = _mean_std([r.get("wall_s") for r in group])
        lines.append(  # means over datasets and seeds (their spread is the data's, not noise)
            f"| {method} | {params:,} | {_fmt(time_it[0], digits=2)} | {_fmt(memory[0], digits=2)} | "
            f"{'—' if steps is None else f'{steps:.0f}'} | {_fmt(wall[0], digits=0)} |"
        )
    return lines


def _not_beating_base(records: Sequence[dict[str, Any]]) -> list[str]:
    worse = [r["cell_id"] for r in records if r.get("best_is_base")]
    if not worse:
        return []
    return ["", "Fine-tuning did not beat the untouched base on validation (the cell kept the base): "
            + ", ".join(worse) + "."]


def markdown_report(spec: StudySpec, records: Sequence[dict[str, Any]]) -> str:
    """``results.md``: scores in the paper's layout, resources, ablations."""
    seeds = sorted({r["seed"] for r in records if r["method"] != "base"})
    lines = [
        f"# Study {spec.name}", "",
        f"Base model `{spec.base_model}`; {len(records)} finished cells; seeds {seeds or [0]}"
        + (f" (mean ± std over {len(seeds)})" if len(seeds) > 1 else "") + ".",
        "Scores on the held-out split: mSA for instance sets, Dice for semantic ones; Point / Box = first prompt, "
        "I_P / I_B = after the corrections; AIS = automatic instance segmentation (UNETR decoder).", "",
        "## Scores", "", *_score_table(records, ablation=False, row_title="method"), *_not_beating_base(records),
        "", "## Resources", "", *_resource_table([r for r in records if r["method"] != "base"]),
    ]
    ablated = list(dict.fromkeys(r["method"] for r in records if r.get("ablation_label")))
    for method in ablated:
        subset = [r for r in records if r["method"] == method]
        lines += ["", f"## Ablation: {method}", "", *_score_table(subset, ablation=True, row_title="setting")]
        defaults = [r for r in subset if not r.get("ablation_label")]
        if defaults:
            default_row = _score_table(defaults, ablation=False, row_title="setting")[2:]
            lines += [line.replace(f"| {method} |", f"| {method} (study default) |", 1) for line in default_row]
    return "\n".join(lines) + "\n"


def _mean_score(record: dict[str, Any]) -> float | None:
    return _mean_std([_score(record, m) for m in MODES])[0]


def _plots(records: Sequence[dict[str, Any]], folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..atomic import atomic_write

    files: dict[str, Path] = {}
    defaults = [r for r in records if not r.get("ablation_label")]
    datasets = _datasets(defaults)
    methods = list(dict.fromkeys(r["method"] for r in defaults))
    if not defaults:
        return files
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    # one row per dataset (a wide figure of side-by-side panels is unreadable with ten methods)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(7.0, 0.9 * len(methods) + 3.0), 2.8 * len(datasets)),
                             squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, dataset in zip(axes[:, 0], datasets):
        modes = _modes(defaults, dataset)
        x = np.arange(len(modes))
        for i, method in enumerate(methods):
            group = [r for r in defaults if r["method"] == method and r["dataset"] == dataset]
            values = [_mean_std([_score(r, m) for r in group])[0] for m in modes]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
                   label=method, color=colors(i))
        metric = next(r["table_metric"] for r in defaults if r["dataset"] == dataset)
        ax.set_xticks(x, [MODE_TITLES[m] for m in modes])
        ax.set_ylim(0, 1)
        ax.set_title(f"{dataset} ({'mSA' if metric == 'msa' else 'Dice'}; AIS: mSA)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("score")
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(folder / "scores.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    files["scores"] = folder / "scores.png"

    trained = [r for r in defaults if r["method"] != "base"]
    for key, x_name, label, log in (
        ("trainable_parameters", "score_vs_parameters", "trainable parameters", True),
        ("time_per_iteration_s", "score_vs_time", "time per iteration (s)", False),
    ):
        points = [(r, r.get(key), _mean_score(r)) for r in trained]
        points = [p for p in points if p[1] and p[2] is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        markers = "osD^vP*X"
        for i, method in enumerate(methods):
            for j, dataset in enumerate(datasets):
                xs = [p[1] for p in points if p[0]["method"] == method and p[0]["dataset"] == dataset]
                ys = [p[2] for p in points if p[0]["method"] == method and p[0]["dataset"] == dataset]
                if xs:
                    ax.scatter(xs, ys, color=colors(i), marker=markers[j % len(markers)],
                               label=method if j == 0 else None, s=40)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean of Point, Box, I_P, I_B")
        ax.set_title("markers: " + ", ".join(f"{markers[j % len(markers)]} {d}" for j, d in enumerate(datasets)),
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        atomic_write(folder / f"{x_name}.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files[x_name] = folder / f"{x_name}.png"
    return files


def write_reports(spec: StudySpec, folder: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Write ``results.csv``, ``results.md`` and the plots from the finished cells; returns (records, files)."""
    from ..atomic import atomic_write_text

    records = collect_records(spec, folder)
    atomic_write_text(folder / "results.csv", _csv_text(long_rows(records)))
    atomic_write_text(folder / "results.md", markdown_report(spec, records))
    files = {"csv": folder / "results.csv", "markdown": folder / "results.md", **_plots(records, folder)}
    return records, files
