"""Results tables like the paper's: one row per (dataset, method, adapter, metric), one column per setting.

Columns: ``point`` / ``box`` (first prompt), ``ip`` / ``ib`` (after the corrections, I_P and I_B) and
``ais`` (automatic instance segmentation, mSA only). ``metric`` says how a row is scored: ``msa``
(microscopy), ``dice`` (medical) or ``iou`` (mean per-object IoU). Missing values are empty in CSV and
``null`` in JSON. Rows are keyed by (dataset, method, adapter, metric): adding a row with an existing key
replaces it, so repeated runs update a table file in place. Files are written atomically.

:class:`ImageJournal` keeps the per-image results of an evaluation that is still running beside its table,
one line per finished image, so that a crash or a full disk loses at most the image in progress.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence
import tempfile

from hf_sam_peft.atomic import NoSpaceLeft, atomic_write_text, is_no_space

__all__ = [
    "KEY_COLUMNS", "METRIC_NAMES", "SCORE_COLUMNS", "ImageJournal", "ResultRow", "ResultsTable", "check_output_folder",
    "check_results_file", "format_rounds",
]

KEY_COLUMNS = ("dataset", "method", "adapter", "metric")
SCORE_COLUMNS = ("point", "box", "ip", "ib", "ais")
METRIC_NAMES = ("msa", "dice", "iou")
_TITLES = {"point": "Point", "box": "Box", "ip": "I_P", "ib": "I_B", "ais": "AIS"}


def _as_score(value: Any, column: str) -> float | None:
    # CSV reads a missing score back as "", JSON as null
    if value is None or value == "":
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{column} must be a number or empty, got {value!r}") from None
    # NaN is kept as missing: standard JSON has no NaN (json.dumps would write a bare NaN token)
    if math.isnan(score):
        return None
    return score


@dataclass
class ResultRow:
    """One line of a results table."""

    dataset: str
    method: str
    adapter: str = ""
    metric: str = "msa"
    point: float | None = None
    box: float | None = None
    ip: float | None = None
    ib: float | None = None
    ais: float | None = None

    def __post_init__(self) -> None:
        for name in ("dataset", "method"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        # "" means the base model; adapter is part of the key, so None and "" must give one key (CSV reads back "")
        self.adapter = "" if self.adapter is None else str(self.adapter)
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"metric must be one of {METRIC_NAMES}, got {self.metric!r}")
        for column in SCORE_COLUMNS:
            # rows read from CSV carry strings: every score becomes float or None here
            setattr(self, column, _as_score(getattr(self, column), column))

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in KEY_COLUMNS)


class ResultsTable:
    """An ordered, keyed collection of :class:`ResultRow` with CSV / JSON writers and a text rendering."""

    def __init__(self, rows: Iterable[ResultRow | dict[str, Any]] = ()) -> None:
        # insertion-ordered: a replaced key keeps its position, so a rerun updates its row in place
        self._rows: dict[tuple[str, ...], ResultRow] = {}
        for row in rows:
            self.add_row(row if isinstance(row, ResultRow) else ResultRow(**row))

    @property
    def rows(self) -> list[ResultRow]:
        return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    def add_row(self, row: ResultRow) -> ResultRow:
        """Insert ``row``, replacing a row with the same key (its position is kept)."""
        if not isinstance(row, ResultRow):
            raise TypeError(f"row must be a ResultRow, got {type(row).__name__}")
        self._rows[row.key] = row
        return row

    def add(self, dataset: str, method: str, adapter: str = "", metric: str = "msa", **scores: Any) -> ResultRow:
        """Add (or replace) one row; ``scores`` are values for :data:`SCORE_COLUMNS`."""
        unknown = set(scores) - set(SCORE_COLUMNS)
        if unknown:
            raise ValueError(f"unknown score columns {sorted(unknown)}; valid: {SCORE_COLUMNS}")
        return self.add_row(ResultRow(dataset, method, adapter, metric, **scores))

    def add_evaluation(
        self,
        dataset: str,
        method: str,
        adapter: str = "",
        interactive: dict[str, Any] | None = None,
        ais: dict[str, Any] | None = None,
        metrics: Sequence[str] = ("msa",),
    ) -> list[ResultRow]:
        """Rows from :func:`~hf_sam_peft.evaluation.interactive.evaluate_interactive` and/or
        :func:`~hf_sam_peft.evaluation.ais.evaluate_ais` results, one per metric (AIS fills ``msa`` only)."""
        if interactive is None and ais is None:
            raise ValueError("add_evaluation needs interactive and/or ais results")
        added = []
        for metric in metrics:
            if metric not in METRIC_NAMES:
                raise ValueError(f"metrics must be taken from {METRIC_NAMES}, got {metric!r}")
            scores = dict((interactive or {}).get(metric, {}))
            if ais is not None and metric == "msa":
                # AIS has no prompts: only its mSA goes in, under the "ais" column of the msa row
                scores["ais"] = ais["msa"]
            added.append(self.add(dataset, method, adapter, metric, **scores))
        return added

    def merge(self, other: "ResultsTable") -> "ResultsTable":
        """Add every row of ``other`` (its rows win on equal keys); returns self."""
        for row in other.rows:
            self.add_row(row)
        return self

    # ----------------------------------------------------------------------------------------- files

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(row) for row in self.rows]

    def to_csv_text(self) -> str:
        buffer = io.StringIO()
        # csv writes \r\n by default: \n gives the same bytes on every platform
        writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(ResultRow)], lineterminator="\n")
        writer.writeheader()
        for record in self.to_records():
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
        return buffer.getvalue()

    def to_json_text(self, details: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {"columns": list(KEY_COLUMNS + SCORE_COLUMNS), "rows": self.to_records()}
        if details is not None:
            payload["details"] = details
        return json.dumps(payload, indent=2, default=_json_default) + "\n"

    def write(self, path: str | os.PathLike, details: dict[str, Any] | None = None) -> Path:
        """Write atomically as CSV (``.csv``) or JSON (``.json``, with optional ``details`` kept beside the rows)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".json"):
            raise ValueError(f"path must end in .csv or .json, got {str(path)!r}")
        text = self.to_csv_text() if suffix == ".csv" else self.to_json_text(details)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a crash mid-write leaves the previous table whole, never a truncated one
        atomic_write_text(path, text)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ResultsTable":
        """Read a table written by :meth:`write` (CSV or JSON by suffix)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"results file {str(path)!r} does not exist")
        if path.suffix.lower() == ".json":
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not a UTF-8 text file") from None
            if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
                raise ValueError(f"{path} is not a results JSON (expected an object with a 'rows' list)")
            records = payload["rows"]
        elif path.suffix.lower() == ".csv":
            try:
                with path.open(newline="", encoding="utf-8") as f:
                    records = list(csv.DictReader(f))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"{path} is not a readable CSV table ({exc})") from None
        else:
            raise ValueError(f"path must end in .csv or .json, got {str(path)!r}")
        try:
            return cls(records)
        # ResultRow(**record) raises TypeError for unknown or missing columns
        except TypeError as err:
            raise ValueError(f"{path} has unexpected columns: {err}") from None

    # ----------------------------------------------------------------------------------------- text

    def format(self, digits: int = 3) -> str:
        """The table as aligned text (scores with ``digits`` decimals, ``-`` where missing)."""
        # only the columns some row fills (an empty table shows them all)
        used = [c for c in SCORE_COLUMNS if any(getattr(r, c) is not None for r in self.rows)] or list(SCORE_COLUMNS)
        header = ["dataset", "method", "adapter", "metric"] + [_TITLES[c] for c in used]
        lines = [
            [r.dataset, r.method, r.adapter or "-", r.metric]
            + ["-" if getattr(r, c) is None else f"{getattr(r, c):.{digits}f}" for c in used]
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
        render = lambda line: "  ".join(  # noqa: E731
            v.ljust(w) if i < len(KEY_COLUMNS) else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))
        ).rstrip()
        return "\n".join([render(header), "  ".join("-" * w for w in widths), *map(render, lines)])

    def __str__(self) -> str:
        return self.format()


def _json_default(value: Any) -> Any:
    """numpy scalars / arrays in ``details`` become plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_rounds(results: dict[str, dict[str, Any]], metric: str = "iou", digits: int = 3) -> str:
    """A Markdown table of per-round scores: one row per (model, start), rounds 0..n as columns.

    ``results`` maps a model name to an :func:`~hf_sam_peft.evaluation.interactive.evaluate_interactive`
    result (its ``"rounds"`` entry). The last column says whether the corrections helped (last round ≥ round 0).
    """
    if not results:
        raise ValueError("results must map at least one model name to an evaluate_interactive result")
    # results may come from runs with different n_corrections: the header spans the longest
    n_rounds = max(len(r["rounds"][s][metric]) for r in results.values() for s in r["rounds"])
    header = ["model", "start", *(f"r{i}" for i in range(n_rounds)), "corrections"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        for start, scores in result["rounds"].items():
            values = scores[metric]
            verdict = "help" if values[-1] >= values[0] else "hurt"
            cells = [name, start, *(f"{v:.{digits}f}" for v in values), f"{verdict} ({values[-1] - values[0]:+.{digits}f})"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- journal


class ImageJournal:
    """Per-image results of a running evaluation, appended to ``.TABLE.KEY.partial.jsonl`` beside its table.

    ``evaluate --out TABLE`` scores image after image and writes the table only at the end; without this a
    crash, a kill or a full disk late in a long run lost every finished image. Each finished image is one
    JSON line, flushed and fsynced as it is written; a rerun with the same ``settings`` (``KEY`` is their hash,
    so evaluations of other models or data into the same table keep their own journals) takes the finished
    images from it and runs only the rest. A last line cut off by the crash is ignored. :meth:`remove` deletes
    the journal once the table holds the results.
    """

    def __init__(self, table: str | os.PathLike, settings: dict[str, Any]) -> None:
        table = Path(table)
        # sort_keys: the same settings in another order hash alike; default=str: paths and the like become text
        canonical = json.dumps(settings, sort_keys=True, default=str)
        # 12 hex digits keep the name short; a collision is caught by the settings header _read compares
        key = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
        self.path = table.parent / f".{table.name}.{key}.partial.jsonl"
        # kept in its JSON round-tripped form (tuples as lists, ...), which is what _read will find in the header
        self.settings = json.loads(canonical)
        self._done: dict[str, dict[int, dict[str, Any]]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        # errors="replace": a crash can cut a multi-byte character; that line then fails json.loads and is skipped
        with self.path.open(encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("settings") != self.settings:
            return  # not this evaluation's (a hash collision, or a file cut off in its first line): start afresh
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                self._done.setdefault(str(entry["kind"]), {})[int(entry["index"])] = dict(entry["result"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # the line a crash cut off
        if self._done:
            counts = ", ".join(f"{len(v)} {k}" for k, v in self._done.items())
            print(f"resuming: {counts} image result(s) of an interrupted run taken from {self.path}", file=sys.stderr)

    def done(self, kind: str) -> dict[int, dict[str, Any]]:
        """Row index -> result of the images of ``kind`` (``interactive``, ``ais``) finished earlier."""
        return dict(self._done.get(kind, {}))

    def _append(self, text: str) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                # on disk before the next image starts: a crash or power cut loses at most the image in progress
                os.fsync(f.fileno())
        except OSError as exc:
            if is_no_space(exc, self.path.parent):
                # a partly written line may stay behind: _read skips it, and record starts the next one on a new line
                raise NoSpaceLeft(self.path) from exc
            raise

    def record(self, kind: str, index: int, result: dict[str, Any]) -> None:
        """Append one finished image (``kind``'s row ``index``)."""
        line = json.dumps({"kind": kind, "index": int(index), "result": result}, default=_json_default) + "\n"
        if not self.path.is_file() or self.path.stat().st_size == 0:
            # a new (or empty) journal starts with the settings header that _read checks
            line = json.dumps({"settings": self.settings}) + "\n" + line
        else:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line  # after a line a crash cut off: keep this one whole
        self._append(line)
        self._done.setdefault(kind, {})[int(index)] = result

    def callback(self, kind: str):
        """``on_image`` for :func:`evaluate_interactive` / :func:`evaluate_ais`: records each finished image."""
        return lambda index, result: self.record(kind, index, result)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- output paths


def _probe_folder(folder: Path, shown: Path, flag: str) -> None:
    """One-line ValueError unless a file can be created in the existing folder ``folder`` (for ``shown``)."""
    # W and X: creating a file needs write and search permission on the folder
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {shown} is not writable ({folder}: permission denied or read-only); pass another {flag}")
    try:
        # access() answers from permission bits and can be wrong (network file systems, root, ACLs): a real file
        # settles it
        with tempfile.TemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {shown} is not writable ({folder}: {exc.strerror or exc}); pass another {flag}") from None


def _existing_ancestor(path: Path, shown: Path, flag: str) -> Path:
    """``path`` or its closest ancestor that exists; a one-line ValueError unless that is a folder."""
    ancestor = path
    # is_symlink(): a dangling link exists as a name though exists() says False; stop there (is_dir then fails)
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {shown} is not writable ({ancestor} is not a folder); pass another {flag}")
    return ancestor


def check_output_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Before any work: ``folder`` is (or can be made) a folder that files can be written to. Creates it.

    A file at ``folder``, a file on its path, or a folder that cannot be written to (permissions, a read-only
    file system) is a one-line ValueError naming it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder; pass another {flag}")
    if not folder.exists():
        # probe the closest existing ancestor first, so a read-only location fails before any folder is made
        _probe_folder(_existing_ancestor(folder, folder, flag), folder, flag)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{flag} {folder} is not writable ({exc.strerror or exc}); pass another {flag}") from None
    _probe_folder(folder, folder, flag)
    return folder


def check_results_file(path: str | os.PathLike, flag: str = "--out") -> ResultsTable | None:
    """Before any work: ``path`` can take a results table (.csv / .json). Returns the table already there
    (None when there is none), so that a malformed one is reported now, not after a long evaluation.

    A folder at ``path``, a file on its path, a folder that cannot be written to, or an existing table that
    cannot be read is a one-line ValueError naming it. Nothing is created.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"{flag} must end in .csv or .json, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a results file; pass a .csv or .json file path")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise ValueError(f"{flag} {path} is not a regular file; pass another {flag}")
        _probe_folder(path.parent, path, flag)  # written by a rename beside it (atomic_write_text)
        try:
            return ResultsTable.read(path)
        except OSError as exc:
            raise ValueError(f"{flag} {path} cannot be read ({exc.strerror or exc}); pass another {flag}") from None
        except ValueError as exc:
            # ResultsTable.read's messages mostly name the file already: never name it twice
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            raise ValueError(f"{flag} holds a table that cannot be updated: {message}") from None
    # no table yet: nothing is created now (write makes the parents), only the closest existing ancestor is probed
    _probe_folder(_existing_ancestor(path.parent, path, flag), path, flag)
    return None
