"""Task specs (GLUE SST-2, QNLI, QQP, MNLI and user `custom` files) and loading from sources.

Sources for a GLUE task are tried in this order, and the one used is reported in
`TextDataset.source` (and logged at INFO level):

1. `data_dir` given by argument / config: a directory in the GLUE layout
   (`<dir>/SST-2/train.tsv`, `<dir>/SST-2/dev.tsv`, `<dir>/QNLI/...`, `<dir>/QQP/...`,
   `<dir>/MNLI/train.tsv`, `<dir>/MNLI/dev_matched.tsv`).
2. The `HFL_DATA_DIR` environment variable: a directory in the same layout.
3. The Hugging Face hub through `datasets.load_dataset("nyu-mll/glue", <config>)`; skipped
   when `HF_DATASETS_OFFLINE` or `HF_HUB_OFFLINE` is set to a true value (1/true/yes/on).

When none has the data, `DataNotFoundError` names every place looked and how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
_TRUE = {"1", "true", "yes", "on"}
_INT_RE = re.compile(r"^[+-]?\d+$")


class DataError(ValueError):
    """Bad or inconsistent data: missing column, empty dataset, unknown label, bad arguments."""


class DataNotFoundError(FileNotFoundError):
    """A data file or a whole task could not be found in any source."""


class SpecError(DataError):
    """A malformed custom dataset spec; ``field`` names the offending key."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a GLUE task is laid out on disk and on the hub.

    Attributes:
      name: task name (`sst2`, `qnli`, `qqp`, `mnli`).
      glue_dir: its directory in the GLUE layout (`SST-2`).
      files: split name -> TSV file name inside `glue_dir`.
      text_a, text_b, label: TSV column names (`text_b` None for single-sentence tasks).
      label_names: class names in GLUE / `datasets` id order.
      hub_config: `nyu-mll/glue` config name.
      hub_splits: split name -> hub split name.
      hub_text_a, hub_text_b: hub column names.
      metrics: GLUE's metrics for the task.
    """

    name: str
    glue_dir: str
    files: Mapping[str, str]
    text_a: str
    text_b: str | None
    label: str
    label_names: tuple[str, ...]
    hub_config: str
    hub_splits: Mapping[str, str]
    hub_text_a: str
    hub_text_b: str | None
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


TASKS: Mapping[str, TaskSpec] = {
    "sst2": TaskSpec(
        name="sst2", glue_dir="SST-2",
        files={"train": "train.tsv", "validation": "dev.tsv"},
        text_a="sentence", text_b=None, label="label",
        label_names=("negative", "positive"),
        hub_config="sst2", hub_splits={"train": "train", "validation": "validation"},
        hub_text_a="sentence", hub_text_b=None),
    "qnli": TaskSpec(
        name="qnli", glue_dir="QNLI",
        files={"train": "train.tsv", "validation": "dev.tsv"},
        text_a="question", text_b="sentence", label="label",
        label_names=("entailment", "not_entailment"),
        hub_config="qnli", hub_splits={"train": "train", "validation": "validation"},
        hub_text_a="question", hub_text_b="sentence"),
    "qqp": TaskSpec(
        name="qqp", glue_dir="QQP",
        files={"train": "train.tsv", "validation": "dev.tsv"},
        text_a="question1", text_b="question2", label="is_duplicate",
        label_names=("not_duplicate", "duplicate"),
        hub_config="qqp", hub_splits={"train": "train", "validation": "validation"},
        hub_text_a="question1", hub_text_b="question2", metrics=("accuracy", "f1")),
    "mnli": TaskSpec(
        name="mnli", glue_dir="MNLI",
        files={"train": "train.tsv", "validation": "dev_matched.tsv",
               "validation_mismatched": "dev_mismatched.tsv"},
        text_a="sentence1", text_b="sentence2", label="gold_label",
        label_names=("entailment", "neutral", "contradiction"),
        hub_config="mnli",
        hub_splits={"train": "train", "validation": "validation_matched",
                    "validation_mismatched": "validation_mismatched"},
        hub_text_a="premise", hub_text_b="hypothesis"),
}
TASK_NAMES: tuple[str, ...] = (*TASKS, "custom")

_SPLIT_ALIASES = {"dev": "validation", "eval": "validation", "valid": "validation",
                  "validation_matched": "validation", "dev_matched": "validation",
                  "dev_mismatched": "validation_mismatched"}


@dataclasses.dataclass(frozen=True)
class CustomSpec:
    """A user's dataset in CSV, TSV, JSON Lines or Parquet files.

    Attributes:
      train: path (or paths, concatenated) of the training split.
      validation: path(s) of the evaluation split, or None.
      text_a: name of the first text column.
      label: name of the label column (string or integer labels).
      text_b: name of the second text column for sentence-pair tasks, or None.
      label_names: the declared label set, in id order. String labels must be one of
        these; integer labels must lie in [0, len(label_names)). When None the set is
        inferred from the *training* split (sorted unique values; integer labels keep
        their numeric order) so that every split uses the same ids.
      format: 'csv', 'tsv', 'jsonl' or 'parquet'; None infers it from the file suffix.
      encoding: text encoding of CSV/TSV/JSONL files (any Python codec name, e.g. 'latin-1').
      drop_missing_labels: drop rows whose label looks missing (empty, NaN, None, null, NA)
        instead of raising `DataError` naming the first such row.
    """

    train: str | Sequence[str]
    text_a: str
    label: str
    validation: str | Sequence[str] | None = None
    text_b: str | None = None
    label_names: tuple[str, ...] | None = None
    format: str | None = None
    encoding: str = "utf-8"
    drop_missing_labels: bool = False


FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
# Label values read as "missing" (compared after strip, case-insensitively).
MISSING_LABELS = ("", "nan", "none", "null", "na", "n/a")


def custom_spec(fields: CustomSpec | Mapping[str, object]) -> CustomSpec:
    """A checked `CustomSpec` from a mapping of its fields (the config's ``data.custom``).

    Raises `SpecError` naming the field: unknown or missing key, wrong type, unknown format
    or encoding."""
    import codecs

    if isinstance(fields, CustomSpec):
        return fields
    if not isinstance(fields, Mapping):
        raise SpecError("custom", f"expected a mapping, got {type(fields).__name__}")
    known = [f.name for f in dataclasses.fields(CustomSpec)]
    for k in fields:
        if k not in known:
            raise SpecError(str(k), f"unknown key (known: {', '.join(known)})")
    for k in ("train", "text_a", "label"):
        if fields.get(k) is None:
            raise SpecError(k, "required")
    for k in ("train", "validation"):
        v = fields.get(k)
        ok = v is None or (isinstance(v, str) and v) or (
            isinstance(v, (list, tuple)) and v and all(isinstance(x, str) and x for x in v))
        if not ok:
            raise SpecError(k, f"expected a file path or a non-empty list of paths, got {v!r}")
    for k in ("text_a", "label", "text_b", "format", "encoding"):
        v = fields.get(k)
        if v is not None and not (isinstance(v, str) and v.strip()):
            raise SpecError(k, f"expected a non-empty string, got {v!r}")
    if fields.get("format") is not None and fields["format"].lower() not in FORMATS:
        raise SpecError("format", f"unknown format {fields['format']!r}; one of csv, tsv, jsonl, parquet")
    if fields.get("encoding") is not None:
        try:
            codecs.lookup(fields["encoding"])
        except LookupError:
            raise SpecError("encoding", f"unknown text encoding {fields['encoding']!r} (e.g. utf-8, latin-1)") from None
    if not isinstance(fields.get("drop_missing_labels", False), bool):
        raise SpecError("drop_missing_labels", f"expected true/false, got {fields['drop_missing_labels']!r}")
    names = fields.get("label_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or len(names) < 2 or not all(
                isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
            raise SpecError("label_names", f"expected a list of at least 2 names, got {names!r}")
        if len({str(n) for n in names}) != len(names):
            raise SpecError("label_names", f"lists a name twice: {list(names)}")
        fields = {**fields, "label_names": tuple(str(n) for n in names)}
    return CustomSpec(**dict(fields))


def check_custom_files(spec: CustomSpec, split: str) -> None:
    """Without parsing rows: every file of ``split`` exists, has a known format, decodes with
    ``spec.encoding`` and has the spec's columns. Raises `DataError` naming the file."""
    files = spec.train if split == "train" else spec.validation
    if files is None:
        raise DataError(f"required: the {split} split's file(s)")
    needed = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + [spec.label]
    for path in _paths(files):
        if not path.is_file():
            raise DataNotFoundError(f"file {path} does not exist")
        fmt = (spec.format or _infer_format(path)).lower()
        if fmt == "parquet":
            continue
        text = _decode(path, spec.encoding)
        first = next((line for line in text.splitlines() if line.strip()), None)
        if first is None:
            raise DataError(f"{path} is empty")
        if fmt in ("csv", "tsv"):
            header = next(csv.reader([first], delimiter="," if fmt == "csv" else "\t"))
        else:
            try:
                header = list(json.loads(first))
            except (ValueError, TypeError) as e:
                raise DataError(f"{path}:1: not valid JSON Lines ({e})") from None
        missing = [c for c in needed if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; available columns: {header}")


def _decode(path: Path, encoding: str) -> str:
    """The text of ``path``; an undecodable byte raises `DataError` naming the file and encoding."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: byte {data[e.start]:#04x} at line {line} (offset {e.start}) is not valid "
                        f"{encoding}; set data.custom.encoding to the file's encoding (e.g. latin-1)") from None


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """One split of a text classification dataset (host-side, numpy).

    Attributes:
      text_a: list[str] of length N, the first (or only) sentence.
      text_b: list[str] of length N for sentence-pair tasks, else None.
      labels: int64 [N], class ids in [0, len(label_names)).
      label_names: class names in id order.
      source: human-readable description of where the data came from.
      task: task name; split: canonical split name.
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str
    task: str = ""
    split: str = ""

    def __len__(self) -> int:
        return len(self.text_a)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def take(self, idx: np.ndarray) -> "TextDataset":
        """The rows ``idx`` (int array), in that order; ``split`` gets a ``[n rows]`` suffix."""
        idx = np.asarray(idx, np.int64)
        pick = lambda col: [col[i] for i in idx]
        return dataclasses.replace(self, text_a=pick(self.text_a), text_b=None if self.text_b is None else pick(self.text_b),
                                   labels=np.asarray(self.labels)[idx], split=f"{self.split}[{len(idx)} rows]")

    def fingerprint(self) -> str:
        """sha256 hex digest of the texts, labels and label names (not of `source`)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.label_names, len(self.text_a), self.text_b is not None]).encode())
        for col in (self.text_a, self.text_b or []):
            for s in col:
                h.update(s.encode("utf-8"))
                h.update(b"\x1f")
            h.update(b"\x1e")
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------------------- labels


def encode_labels(raw: Sequence[object], label_names: tuple[str, ...], where: str,
                  set_name: str = "the declared label set", origins: Sequence[str] | None = None) -> np.ndarray:
    """Map raw labels (names or integer ids) to int64 ids [N] against a declared label set.

    A raw value equal to a name gets that name's index; an integer (or integer-looking
    string) must lie in [0, len(label_names)). Anything else raises `DataError` naming the row
    (``origins[i]`` when given, else ``where`` and the 0-based row index).
    """
    index = {name: i for i, name in enumerate(label_names)}
    out = np.empty(len(raw), dtype=np.int64)
    k = len(label_names)
    for i, v in enumerate(raw):
        s = v if isinstance(v, str) else None
        if s is not None and s.strip() in index:
            out[i] = index[s.strip()]
            continue
        iv = _as_int(v)
        if iv is None or not 0 <= iv < k:
            row = origins[i] if origins is not None else f"{where}: row {i}"
            raise DataError(f"{row} has label {v!r}, outside {set_name} {list(label_names)} (ids 0..{k - 1})")
        out[i] = iv
    return out


def _as_int(v: object) -> int | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and _INT_RE.match(v.strip()):
        return int(v.strip())
    return None


def infer_label_names(raw: Sequence[object]) -> tuple[str, ...]:
    """The label set of raw labels: sorted integers (as strings) if all are integer-like,
    else sorted unique strings. Integers are mapped to their rank (0..K-1 stay identity)."""
    ints = [_as_int(v) for v in raw]
    if all(i is not None for i in ints):
        return tuple(str(i) for i in sorted(set(ints)))
    return tuple(sorted({str(v).strip() for v in raw}))


# ----------------------------------------------------------------------------- file readers


def _canonical_split(task: str, split: str, allowed: Sequence[str]) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in allowed:
        raise DataError(f"task {task!r} has no labelled split {split!r}; choose from {list(allowed)} "
                        "(GLUE test splits carry no labels)")
    return s


def _read_glue_tsv(path: Path, columns: Sequence[str]) -> tuple[dict[str, list[str]], int]:
    """Read named columns from a raw GLUE TSV (csv.QUOTE_NONE, header line, strip spaces).

    Rows whose field count differs from the header (a few exist in GLUE's QQP train file)
    are skipped; the number skipped is returned.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty (no header line)")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; header has {header}")
        pos = [header.index(c) for c in columns]
        out: dict[str, list[str]] = {c: [] for c in columns}
        skipped = 0
        for row in reader:
            if len(row) != len(header):
                if not row:
                    continue
                skipped += 1
                continue
            for c, p in zip(columns, pos):
                out[c].append(row[p].strip())
    if skipped:
        log.warning("%s: skipped %d malformed row(s) whose field count differs from the header",
                    path, skipped)
    return out, skipped


def _read_table(path: Path, fmt: str | None, encoding: str = "utf-8") -> list[dict[str, object]]:
    """Read a CSV / TSV / JSON Lines / Parquet file into a list of row dicts."""
    import io

    if not path.is_file():
        raise DataNotFoundError(f"custom dataset file not found: {path}")
    fmt = (fmt or _infer_format(path)).lower()
    if fmt in ("csv", "tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with io.StringIO(_decode(path, encoding), newline="") as f:
            return list(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"))
    if fmt in ("jsonl", "json"):
        rows = []
        with io.StringIO(_decode(path, encoding)) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not valid JSON Lines ({e})") from e
        return rows
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on environment
            raise DataError("reading Parquet needs `pyarrow` (pip install pyarrow)") from e
        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unknown format {fmt!r}; use csv, tsv, jsonl or parquet")


def _infer_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"csv": "csv", "tsv": "tsv", "txt": "tsv", "jsonl": "jsonl", "ndjson": "jsonl",
           "json": "jsonl", "parquet": "parquet", "pq": "parquet"}.get(suffix)
    if fmt is None:
        raise DataError(f"{path}: cannot infer the format from suffix {path.suffix!r}; "
                        "set CustomSpec.format to csv, tsv, jsonl or parquet")
    return fmt


# ----------------------------------------------------------------------------- loaders


def load_task(task: str, split: str, data_dir: str | os.PathLike | None = None,
              custom: CustomSpec | Mapping[str, object] | None = None,
              hub: bool = True) -> TextDataset:
    """Load one labelled split of a task.

    Args:
      task: one of `TASK_NAMES` ('sst2', 'qnli', 'qqp', 'mnli', 'custom').
      split: 'train' or 'validation' (alias 'dev'); MNLI 'validation' is
        validation_matched, 'validation_mismatched' is also available.
      data_dir: a directory in the GLUE layout, tried first.
      custom: a `CustomSpec` (or a dict of its fields) when task == 'custom'.
      hub: allow the Hugging Face hub as the last source.

    Returns:
      A `TextDataset`; `source` says which file or hub dataset it came from.

    Raises:
      DataNotFoundError: no source holds the data (the message lists every place looked).
      DataError: bad split, missing column, empty dataset, label outside the label set.
    """
    if task == "custom":
        if custom is None:
            raise DataError("task 'custom' needs `custom=CustomSpec(train=..., text_a=..., label=...)`")
        try:
            spec = custom_spec(custom)
        except SpecError as e:
            raise DataError(f"custom dataset spec: {e}") from None
        return _load_custom(spec, split)
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose from {list(TASK_NAMES)}")
    spec = TASKS[task]
    split = _canonical_split(task, split, list(spec.files))
    tried: list[str] = []
    dirs: list[tuple[str, str | os.PathLike | None]] = [
        ("data_dir argument", data_dir), ("HFL_DATA_DIR", os.environ.get("HFL_DATA_DIR") or None)]
    for origin, d in dirs:
        if d is None:
            tried.append(f"{origin}: not set")
            continue
        path = Path(d).expanduser() / spec.glue_dir / spec.files[split]
        if path.is_file():
            ds = _load_glue_file(spec, split, path, f"local GLUE file {path} (from {origin})")
            log.info("loaded %s/%s: %d rows from %s", task, split, len(ds), ds.source)
            return ds
        tried.append(f"{origin}: {path} does not exist")
    hub_name = f"Hugging Face hub {HUB_DATASET!r} config {spec.hub_config!r} split {spec.hub_splits[split]!r}"
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
               if os.environ.get(v, "").strip().lower() in _TRUE]
    if not hub:
        tried.append(f"{hub_name}: disabled (hub=False)")
    elif offline:
        tried.append(f"{hub_name}: skipped because {offline[0]}={os.environ[offline[0]]}")
    else:
        try:
            ds = _load_hub(spec, split)
            log.info("loaded %s/%s: %d rows from %s", task, split, len(ds), ds.source)
            return ds
        except Exception as e:  # noqa: BLE001 - any hub failure falls through to the report
            tried.append(f"{hub_name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
    raise DataNotFoundError(
        f"could not find {task}/{split}. Places looked, in order:\n  - " + "\n  - ".join(tried) +
        f"\nTo fix: export HFL_DATA_DIR=/path/to/glue (a directory holding "
        f"{spec.glue_dir}/{spec.files[split]}) or pass data_dir=...; or, online with "
        f"HF_DATASETS_OFFLINE unset, run: python -c \"import datasets; "
        f"datasets.load_dataset('{HUB_DATASET}', '{spec.hub_config}')\"")


def _load_glue_file(spec: TaskSpec, split: str, path: Path, source: str) -> TextDataset:
    cols = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + [spec.label]
    table, _ = _read_glue_tsv(path, cols)
    if not table[spec.label]:
        raise DataError(f"{path}: dataset is empty (no rows after the header)")
    labels = encode_labels(table[spec.label], spec.label_names, str(path))
    if split == "train":
        check_classes(labels, spec.label_names, str(path))
    return TextDataset(text_a=table[spec.text_a],
                       text_b=table[spec.text_b] if spec.text_b else None,
                       labels=labels, label_names=spec.label_names, source=source,
                       task=spec.name, split=split)


def _load_hub(spec: TaskSpec, split: str) -> TextDataset:
    import datasets  # imported lazily: slow, and only needed for this source

    hsplit = spec.hub_splits[split]
    d = datasets.load_dataset(HUB_DATASET, spec.hub_config, split=hsplit)
    labels = np.asarray(d["label"], dtype=np.int64)
    if labels.size == 0:
        raise DataError(f"{HUB_DATASET}/{spec.hub_config}/{hsplit} is empty")
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise DataError(f"{HUB_DATASET}/{spec.hub_config}/{hsplit}: labels outside 0..{spec.num_classes - 1}")
    return TextDataset(
        text_a=[s.strip() for s in d[spec.hub_text_a]],
        text_b=[s.strip() for s in d[spec.hub_text_b]] if spec.hub_text_b else None,
        labels=labels, label_names=spec.label_names,
        source=f"Hugging Face hub {HUB_DATASET} config {spec.hub_config} split {hsplit}",
        task=spec.name, split=split)


def _paths(p: str | Sequence[str]) -> list[Path]:
    return [Path(p).expanduser()] if isinstance(p, (str, os.PathLike)) else [Path(x).expanduser() for x in p]


def _read_custom_rows(spec: CustomSpec, split: str) -> tuple[list[dict[str, object]], str, list[str]]:
    """Rows of ``split`` (all files concatenated), where they came from, and each row's origin
    (``FILE row N``, N = 1 for the first data row)."""
    files = spec.train if split == "train" else spec.validation
    if files is None:
        raise DataError(f"custom dataset has no {split!r} split (CustomSpec.validation is None)")
    rows: list[dict[str, object]] = []
    origins: list[str] = []
    paths = _paths(files)
    for path in paths:
        part = _read_table(path, spec.format, spec.encoding)
        if not part:
            raise DataError(f"custom dataset file {path} is empty (no rows)")
        needed = [spec.text_a] + ([spec.text_b] if spec.text_b else []) + [spec.label]
        missing = [c for c in needed if c not in part[0]]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; available columns: {list(part[0])}")
        rows.extend(part)
        origins.extend(f"{path} row {n}" for n in range(1, len(part) + 1))
    return rows, ", ".join(str(p) for p in paths), origins


def looks_missing(v: object) -> bool:
    """True for label values that mean "no label": None, NaN, and strings in `MISSING_LABELS`."""
    if v is None:
        return True
    if isinstance(v, (float, np.floating)):
        return bool(np.isnan(v))
    return isinstance(v, str) and v.strip().lower() in MISSING_LABELS


def _labelled_rows(spec: CustomSpec, split: str) -> tuple[list[dict[str, object]], str, list[str]]:
    """`_read_custom_rows` with missing-looking labels rejected (the first one named), or dropped
    when ``spec.drop_missing_labels``."""
    rows, where, origins = _read_custom_rows(spec, split)
    missing = [i for i, r in enumerate(rows) if looks_missing(r.get(spec.label))]
    if missing and not spec.drop_missing_labels:
        i = missing[0]
        raise DataError(f"{origins[i]}: label {rows[i].get(spec.label)!r} in column {spec.label!r} looks missing "
                        f"({len(missing)} such row(s)); fix the data or set data.custom.drop_missing_labels: true")
    if missing:
        log.warning("custom dataset %s (%s): dropped %d row(s) with a missing label", where, split, len(missing))
        keep = sorted(set(range(len(rows))) - set(missing))
        rows, origins = [rows[i] for i in keep], [origins[i] for i in keep]
        if not rows:
            raise DataError(f"custom dataset {where}: every row's label is missing")
    return rows, where, origins


def check_classes(labels: np.ndarray, label_names: Sequence[str], where: str) -> None:
    """Training data must hold at least two classes (else accuracy and loss mean nothing)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(label_names))
    present = {str(n): int(c) for n, c in zip(label_names, counts) if c > 0}
    if len(present) < 2:
        raise DataError(f"{where}: the training data holds {len(present)} class(es) "
                        f"({', '.join(f'{n!r}: {c} rows' for n, c in present.items()) or 'no rows'}); "
                        "classification needs at least 2")


def _load_custom(spec: CustomSpec, split: str) -> TextDataset:
    split = _canonical_split("custom", split, ["train", "validation"])
    rows, where, origins = _labelled_rows(spec, split)

    def text(r: dict[str, object], c: str, i: int) -> str:
        v = r.get(c)
        if v is None:
            raise DataError(f"{origins[i]}: no value in column {c!r}")
        return str(v).strip()

    raw = [r.get(spec.label) for r in rows]
    if spec.label_names is not None:
        names, set_name = tuple(str(n) for n in spec.label_names), "the declared label set (label_names)"
    else:  # ids must match the training split's
        train_raw = raw if split == "train" else [r.get(spec.label) for r in _labelled_rows(spec, "train")[0]]
        names, set_name = infer_label_names(train_raw), "the training split's label set"
    if spec.label_names is None and all(_as_int(v) is not None for v in raw) \
            and all(n.lstrip("+-").isdigit() for n in names):
        # inferred integer label set: map each integer to its rank in the set
        rank = {int(n): i for i, n in enumerate(names)}
        bad = [i for i, v in enumerate(raw) if _as_int(v) not in rank]
        if bad:
            raise DataError(f"{origins[bad[0]]}: label {raw[bad[0]]!r} is not in {set_name} {list(names)}")
        labels = np.array([rank[_as_int(v)] for v in raw], dtype=np.int64)
    else:
        labels = encode_labels([str(v).strip() for v in raw] if spec.label_names is None else raw,
                               names, f"custom dataset {where}", set_name=set_name, origins=origins)
    if split == "train":
        check_classes(labels, names, f"custom dataset {where}")
    log.info("custom dataset %s (%s): %d rows, label set %s", where, split, len(rows), list(names))
    return TextDataset(
        text_a=[text(r, spec.text_a, i) for i, r in enumerate(rows)],
        text_b=[text(r, spec.text_b, i) for i, r in enumerate(rows)] if spec.text_b else None,
        labels=labels, label_names=names,
        source=f"custom files {where} (label set {list(names)})", task="custom", split=split)
