"""A study's tables and plots, made from its finished cells.

- ``results.csv``: one row per cell and metric (``msa``, ``dice``, ``iou``; ``ais`` filled on ``msa`` rows), with
  the cell's trainable parameters, time per iteration, peak memory and wall time: ``pandas.read_csv`` or
  ``datasets.load_dataset("csv", data_files=...)`` read it as is.
- ``results.md``: the paper's layout (Tab. 1/2: methods as rows, datasets × prompt modes as columns, each
  dataset scored by its own metric: mSA for instance sets, Dice for semantic ones), the resource table
  (trainable parameters, time per iteration, peak memory), and one table per ablated method.
- ``scores.png`` (grouped bars per dataset), ``score_vs_parameters.png`` (the paper's efficiency comparison:
  per dataset and prompt mode the score against trainable parameters on a log axis, one labelled point per
  method, one colour and marker per base model, the untouched base as a dashed line; the points are
  :func:`efficiency_points`), ``score_vs_time.png`` (the mean of the four prompt modes against time per iteration).

Scores of several seeds are averaged (``±`` their standard deviation in the Markdown). Where the study has
several base models, every row is ``method @ model``.
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

__all__ = ["CSV_COLUMNS", "collect_records", "efficiency_points", "long_rows", "markdown_report", "write_reports"]

MODES = ("point", "box", "ip", "ib")
MODE_TITLES = {"point": "Point", "box": "Box", "ip": "I_P", "ib": "I_B", "ais": "AIS"}
RECORD_COLUMNS = (  # copied from each cell's result as they are
    "trainable_parameters", "time_per_iteration_s", "peak_memory_gib", "wall_s", "steps", "best_is_base",
    "n_images", "n_objects",
)
CSV_COLUMNS = (
    "study", "cell_id", "dataset", "method", "base_model", "ablation", "seed", "metric", "point", "box", "ip", "ib",
    "ais", *RECORD_COLUMNS,
)


def collect_records(spec: StudySpec, folder: Path) -> list[dict[str, Any]]:
    """The results of the study's finished cells, in grid order."""
    from ..hub.provenance import read_json_file

    # walked from the spec, not the folder: cells a study file no longer lists stay out of its tables
    records = []
    for cell in spec.cells():
        path = folder / "cells" / cell.cell_id / RESULT_NAME
        if path.is_file():
            record = read_json_file(path)  # damaged: one line naming the file and the line
            record["ablation_label"] = cell.ablation_label
            record.setdefault("base_model", spec.model_of(cell))  # (cells finished before results named it)
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
                "method": record["method"], "base_model": record.get("base_model"),
                "ablation": record.get("ablation_label", ""), "seed": record["seed"],
                "metric": metric, **{mode: scores.get(mode) for mode in MODES},
                "ais": ais["msa"] if ais and metric == "msa" else None,  # AIS is scored by mSA only
                **{key: record.get(key) for key in RECORD_COLUMNS},
            })
    return rows


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    # "\n", not csv's default "\r\n"; None becomes an empty field, which pandas reads as NaN
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    # not scored (None) and NaN both stay out of the mean; a single value has no spread (stdev needs two)
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
    # each dataset by its own metric (mSA for instance sets, Dice for semantic ones), as the paper's tables
    return record["scores"][record["table_metric"]].get(mode)


def _models(records: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r.get("base_model", "") for r in records))


def _row_name(method: str, label: str, model: str, several_models: bool) -> str:
    """``method``, ``method (ablation)``; ``... @ model`` where the records hold several base models."""
    name = f"{method} ({label})" if label else method
    return f"{name} @ {model}" if several_models else name


def _grouped(records: Sequence[dict[str, Any]], ablation: bool) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(row name, ablation label, dataset) -> records of its seeds (a row: a method, ablation value and model)."""
    several = len(_models(records)) > 1
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        label = record.get("ablation_label", "")
        if bool(label) == ablation:
            name = _row_name(record["method"], label, record.get("base_model", ""), several)
            groups[(name, label, record["dataset"])].append(record)
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
    # rows in the order of the records (grid order), each once across its datasets
    row_keys = list(dict.fromkeys((name, label) for name, label, _ in groups))
    for name, label in row_keys:
        cells = []
        for dataset, mode in columns:
            values = [_score(r, mode) for r in groups.get((name, label, dataset), [])]
            cells.append(_fmt(*_mean_std(values)))
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def _resource_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per method (default cells, all datasets and seeds): trainable parameters, time per iteration, peak memory."""
    lines = [
        "| method | trainable parameters | time / iteration (s) | peak memory (GiB) | steps | wall time per cell (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    several = len(_models(records)) > 1
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if not record.get("ablation_label"):
            by_method[_row_name(record["method"], "", record.get("base_model", ""), several)].append(record)
    for method, group in by_method.items():
        # the first cell's count: seeds train the same parameters (a dataset that adds a UNETR decoder would not)
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


PLOT_TITLES = {
    "scores": "scores per dataset and prompt mode",
    "score_vs_parameters": "score against trainable parameters (log scale): one point per method and base model",
    "score_vs_time": "mean score against time per iteration",
}


def markdown_report(spec: StudySpec, records: Sequence[dict[str, Any]], plots: Sequence[str] = ()) -> str:
    """``results.md``: scores in the paper's layout, resources, ablations; ``plots``: names of the PNGs beside
    it (:data:`PLOT_TITLES` keys) to show under "Plots"."""
    # base cells always carry seed 0 (nothing trains), so they do not count as a seed
    seeds = sorted({r["seed"] for r in records if r["method"] != "base"})
    lines = [
        f"# Study {spec.name}", "",
        f"Base model{'s' if len(spec.base_models) > 1 else ''} `{spec.base_model}`; {len(records)} finished cells; "
        f"seeds {seeds or [0]}"
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
            # [2:]: the rows without the header and separator, appended under the ablation table
            default_row = _score_table(defaults, ablation=False, row_title="setting")[2:]
            lines += [line.replace(f"| {method} ", f"| {method} (study default) ", 1) for line in default_row]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{PLOT_TITLES.get(name, name)}]({name}.png)" for name in plots]
    return "\n".join(lines) + "\n"


def _mean_score(record: dict[str, Any]) -> float | None:
    return _mean_std([_score(record, m) for m in MODES])[0]


def efficiency_points(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of ``score_vs_parameters.png``: one per base model, method, dataset and prompt mode.

    Default cells only (no ablation values), the score the tables show (the dataset's metric; AIS: mSA) averaged
    over seeds, against the method's trainable parameters (the same in every seed). The untouched base is a
    point with 0 trainable parameters (drawn as a dashed line: a log axis has no 0). Each point:
    ``{"model", "method", "dataset", "mode", "metric", "trainable_parameters", "score", "n_seeds"}``.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if not record.get("ablation_label"):
            groups[(record.get("base_model", ""), record["method"], record["dataset"])].append(record)
    points = []
    for (model, method, dataset), group in groups.items():
        for mode in _modes(records, dataset):
            score = _mean_std([_score(r, mode) for r in group])[0]
            if score is None:
                continue
            points.append({
                "model": model, "method": method, "dataset": dataset, "mode": mode,
                "metric": "msa" if mode == "ais" else group[0]["table_metric"],
                # one dataset's seeds: the same parameters train in each, so the first record's count stands
                "trainable_parameters": int(group[0]["trainable_parameters"]), "score": score, "n_seeds": len(group),
            })
    return points


_MARKERS = "osD^vP*X"


def _efficiency_figure(points: Sequence[dict[str, Any]]):
    """Panels per dataset (rows) and prompt mode (columns): score against trainable parameters, log x; each
    method a labelled point, each base model a colour and marker, the untouched base a dashed line."""
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(p["dataset"] for p in points))
    models = list(dict.fromkeys(p["model"] for p in points))
    modes = {d: list(dict.fromkeys(p["mode"] for p in points if p["dataset"] == d)) for d in datasets}
    n_cols = max(len(m) for m in modes.values())
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(datasets), n_cols, figsize=(3.4 * n_cols + 1.6, 3.0 * len(datasets)),
                             squeeze=False)
    labelled: set[str] = set()  # one legend entry per model
    for row, dataset in enumerate(datasets):
        for col in range(n_cols):
            ax = axes[row][col]
            if col >= len(modes[dataset]):  # a dataset without AIS has one panel fewer than the widest row
                ax.set_visible(False)
                continue
            mode = modes[dataset][col]
            here = [p for p in points if p["dataset"] == dataset and p["mode"] == mode]
            for j, model in enumerate(models):
                # tab10 has 10 colours and there are 8 markers: cycling both keeps more models apart than either
                style = dict(color=colors(j % 10), marker=_MARKERS[j % len(_MARKERS)])
                for p in (p for p in here if p["model"] == model):
                    if p["method"] == "base":
                        ax.axhline(p["score"], color=style["color"], linestyle="--", linewidth=0.9)
                        continue
                    label = None if model in labelled else (model or "model")
                    labelled.add(model)
                    ax.scatter([p["trainable_parameters"]], [p["score"]], s=36, label=label, **style)
                    ax.annotate(p["method"], (p["trainable_parameters"], p["score"]), textcoords="offset points",
                                xytext=(4, 3), fontsize=6)
            ax.set_xscale("log")
            metric = "mSA" if here and here[0]["metric"] == "msa" else "Dice"
            ax.set_title(f"{dataset}: {MODE_TITLES[mode]}", fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
            ax.set_xlabel("trainable parameters", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, which="both")
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="upper right", title="base model (dashed: untouched)",
                   title_fontsize=7)
    # keep the right 1.5 inches of the figure (its width: 3.4 * n_cols + 1.6) free for the legend
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.4 * n_cols + 1.6), 1))
    return fig


def _plots(records: Sequence[dict[str, Any]], folder: Path) -> dict[str, Path]:
    import matplotlib

    # headless: a study runs on servers and in cell processes without a display; set before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..atomic import atomic_write

    files: dict[str, Path] = {}
    defaults = [r for r in records if not r.get("ablation_label")]
    if not defaults:
        return files
    several = len(_models(defaults)) > 1

    def name_of(record: dict[str, Any]) -> str:
        return _row_name(record["method"], "", record.get("base_model", ""), several)

    datasets = _datasets(defaults)
    series = list(dict.fromkeys(name_of(r) for r in defaults))
    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    # one row per dataset (a wide figure of side-by-side panels is unreadable with ten methods)
    fig, axes = plt.subplots(len(datasets), 1, figsize=(max(7.0, 0.9 * len(series) + 3.0), 2.8 * len(datasets)),
                             squeeze=False)
    width = 0.8 / max(len(series), 1)
    for ax, dataset in zip(axes[:, 0], datasets):
        modes = _modes(defaults, dataset)
        x = np.arange(len(modes))
        for i, name in enumerate(series):
            group = [r for r in defaults if name_of(r) == name and r["dataset"] == dataset]
            values = [_mean_std([_score(r, m) for r in group])[0] for m in modes]
            # bars centred on each mode's tick; NaN leaves a gap where 0 would read as a score
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
                   label=name, color=colors(i % colors.N))
        metric = next(r["table_metric"] for r in defaults if r["dataset"] == dataset)
        ax.set_xticks(x, [MODE_TITLES[m] for m in modes])
        ax.set_ylim(0, 1)
        ax.set_title(f"{dataset} ({'mSA' if metric == 'msa' else 'Dice'}; AIS: mSA)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("score")
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    # atomic_write calls the lambda at once, so it saves this figure before `fig` is rebound below
    atomic_write(folder / "scores.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    files["scores"] = folder / "scores.png"

    points = efficiency_points(defaults)
    # a log axis needs a positive x: without a trained method there is nothing to place on it
    if any(p["method"] != "base" and p["trainable_parameters"] > 0 for p in points):
        fig = _efficiency_figure(points)
        atomic_write(folder / "score_vs_parameters.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files["score_vs_parameters"] = folder / "score_vs_parameters.png"

    trained = [r for r in defaults if r["method"] != "base"]
    timed = [(r, r.get("time_per_iteration_s"), _mean_score(r)) for r in trained]
    # no step timed (None, or 0) or no score: nothing to place
    timed = [p for p in timed if p[1] and p[2] is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, name in enumerate(series):
            for j, dataset in enumerate(datasets):
                mine = [p for p in timed if name_of(p[0]) == name and p[0]["dataset"] == dataset]
                if mine:
                    ax.scatter([p[1] for p in mine], [p[2] for p in mine], color=colors(i % colors.N),
                               marker=_MARKERS[j % len(_MARKERS)], label=name if j == 0 else None, s=40)
        ax.set_xlabel("time per iteration (s)")
        ax.set_ylabel("mean of Point, Box, I_P, I_B")
        ax.set_title("markers: " + ", ".join(f"{_MARKERS[j % len(_MARKERS)]} {d}" for j, d in enumerate(datasets)),
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        atomic_write(folder / "score_vs_time.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        files["score_vs_time"] = folder / "score_vs_time.png"
    return files


def write_reports(spec: StudySpec, folder: Path) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Write ``results.csv``, the plots and ``results.md`` (which shows the plots) from the finished cells;
    returns (records, files)."""
    from ..atomic import atomic_write_text

    records = collect_records(spec, folder)
    atomic_write_text(folder / "results.csv", _csv_text(long_rows(records)))
    # the plots first: results.md links only the ones actually written
    plots = _plots(records, folder)
    atomic_write_text(folder / "results.md", markdown_report(spec, records, plots=list(plots)))
    return records, {"csv": folder / "results.csv", "markdown": folder / "results.md", **plots}
