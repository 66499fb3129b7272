"""`run_study`: every cell of a study, each once; a killed or failed study resumes where it stopped.

Layout of the study folder::

    study.yaml                     the study file as given (the last run's; with --methods / --models: as run)
    cells/<cell_id>/cell.json      what the cell runs (method, options, training, data, evaluation)
    cells/<cell_id>/run/           its training run (checkpoints, adapter with model card, loss curve)
    cells/<cell_id>/log.txt        its output
    cells/<cell_id>/cell_result.json   written last and atomically: the cell is done
    results.csv, results.md, *.png     the study's tables and plots (rewritten after every cell)

A finished cell is never run again. A cell whose settings differ from those it finished with is an error
(never a silent mix of two settings in one table), unless ``overwrite=True``, which runs it again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from .cell import RESULT_NAME, RUN_FOLDER, SPEC_NAME, run_cell
from .spec import Cell, StudySpec, load_study

__all__ = ["StudyResult", "cell_settings", "run_study", "study_folder"]

CELLS = "cells"


@dataclass
class StudyResult:
    """What a call of :func:`run_study` did and where the tables are."""

    folder: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> last line of its error
    records: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def study_folder(spec: StudySpec, output_dir: Optional[str | os.PathLike] = None) -> Path:
    return Path(output_dir or spec.output_dir or Path("studies") / spec.name)


def cell_settings(spec: StudySpec, cell: Cell) -> dict[str, Any]:
    """Everything a cell's result depends on (its ``cell.json``)."""
    options, training, data = spec.cell_options(cell)
    return {
        "study": spec.name,
        "cell_id": cell.cell_id,
        "dataset": cell.dataset,
        "method": cell.method,
        "seed": cell.seed,
        "ablation": dict(cell.ablation),
        "base_model": spec.model_of(cell),
        # a base cell trains nothing: method options and data settings do not touch its result, and leaving them
        # out keeps a finished base cell valid when they change
        "method_options": options if cell.method != "base" else {},
        "training": training,
        "data": data if cell.method != "base" else {},
        "ais": spec.ais,
        "evaluation": spec.evaluation,
    }


def _canonical(value: Any) -> str:
    # compared as canonical JSON text: key order and tuple-vs-list make no difference, so the settings read back
    # from cell.json equal the live ones they were written from
    return json.dumps(value, sort_keys=True, default=str)


def _finished(folder: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Whether the cell folder holds a finished run of exactly these settings.

    A cell run (finished, or killed part-way) with other settings is an error without ``overwrite``; with it,
    that run's folder is deleted here so that the cell starts again instead of resuming the old checkpoints.
    A killed run with the same settings is kept: the cell resumes from its newest intact checkpoint.
    """
    from ..hub.provenance import read_json_file

    result, spec = folder / RESULT_NAME, folder / SPEC_NAME
    # a damaged cell.json (one line naming it) is an error, never taken for other settings to be overwritten
    same = spec.is_file() and _canonical(read_json_file(spec)) == _canonical(settings)
    started = result.is_file() or (folder / RUN_FOLDER).exists()
    if same and result.is_file() and not overwrite:
        return True
    if not same and started and not overwrite:
        state = "finished" if result.is_file() else "was started"
        raise ValueError(
            f"cell {settings['cell_id']} in {folder.parent.parent} {state} with other settings than the study now "
            "gives; pass another output folder, or overwrite=True (--overwrite) to run it again"
        )
    # only run/ goes: log.txt is appended to, cell.json rewritten and the result unlinked by the runner
    if overwrite and started:
        shutil.rmtree(folder / RUN_FOLDER, ignore_errors=True)
    return False


def _study_text(spec: StudySpec) -> str:
    """The study file as run: its text, or, where the command line replaced keys, the file with them replaced
    (so that ``hf-sam-peft study <folder>/study.yaml`` runs this grid again)."""
    import yaml

    text = Path(spec.path).read_text(encoding="utf-8")
    if not spec.overrides:
        return text
    raw = {**yaml.safe_load(text), **spec.overrides}
    header = f"# {spec.path} with {', '.join(spec.overrides)} from the command line\n"
    return header + yaml.safe_dump(raw, sort_keys=False)


def _run_isolated(folder: Path, progress: bool, threads: Optional[int]) -> None:
    """The cell in its own Python process (own peak memory; a crash loses this cell only); its output to log.txt."""
    command = [sys.executable, "-m", "hf_sam_peft.study.cell", str(folder)]
    if progress:
        command.append("--progress")
    if threads:
        command += ["--threads", str(threads)]
    # unbuffered: log.txt holds the output up to the moment of a crash; appended, so earlier attempts stay
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / "log.txt", "a", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        lines = (folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        # the last line is the cell's one-line error (run_command's "PROG: error: ...") or a traceback's last line
        raise RuntimeError(lines[-1] if lines else f"exit status {code}")


def run_study(
    study: StudySpec | str | os.PathLike,
    output_dir: Optional[str | os.PathLike] = None,
    *,
    only: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    isolate: bool = True,
    threads: Optional[int] = None,
    progress: bool = True,
) -> StudyResult:
    """Run every unfinished cell of ``study`` (a :class:`StudySpec` or a study file), then write its tables.

    ``only``: run just the cells whose id contains one of these strings (the tables still cover every finished
    cell). ``isolate=False`` runs cells in this process (tests; peak memory is then the process's).
    A failing cell is reported and the others go on; run again to retry it.
    """
    from ..atomic import atomic_write_text
    from ..run_lock import output_lock
    from .report import write_reports

    spec = load_study(study) if not isinstance(study, StudySpec) else study
    folder = study_folder(spec, output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder):  # one study at a time in a folder: two would run and rewrite the same cells
        if spec.path is not None:
            atomic_write_text(folder / "study.yaml", _study_text(spec))
        result = StudyResult(folder=folder)
        cells = spec.cells()
        # every cell is judged before any runs: a cell whose settings changed stops the study at once, not hours in
        todo: list[tuple[Cell, Path, dict[str, Any]]] = []
        for cell in cells:
            cell_dir = folder / CELLS / cell.cell_id
            settings = cell_settings(spec, cell)
            if only and not any(part in cell.cell_id for part in only):
                continue
            if _finished(cell_dir, settings, overwrite):
                result.skipped.append(cell.cell_id)
            else:
                todo.append((cell, cell_dir, settings))
        bar = tqdm(todo, desc=f"study {spec.name}", unit="cell", disable=not progress)
        for cell, cell_dir, settings in bar:
            bar.set_postfix_str(cell.cell_id)
            cell_dir.mkdir(parents=True, exist_ok=True)
            (cell_dir / RESULT_NAME).unlink(missing_ok=True)  # (only reached with overwrite) not done until rerun
            # the cell process reads its settings from this file; written before it starts, and before the result
            atomic_write_text(cell_dir / SPEC_NAME, json.dumps(settings, indent=2, default=str))
            try:
                if isolate:
                    _run_isolated(cell_dir, progress=False, threads=threads)
                else:
                    run_cell(settings, cell_dir, progress=False)
                result.ran.append(cell.cell_id)
            except Exception as exc:  # a cell's failure must not lose the other cells' work
                message = " ".join(str(exc).split()) or type(exc).__name__
                result.failed[cell.cell_id] = message
                tqdm.write(f"cell {cell.cell_id} failed: {message} (see {cell_dir / 'log.txt'})")
            # after every cell: a killed study still leaves tables of everything finished so far
            result.records, result.files = write_reports(spec, folder)
        if not todo:
            result.records, result.files = write_reports(spec, folder)
        return result
