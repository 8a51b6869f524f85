"""Read rows from JSON, JSONL, CSV/TSV, Parquet, a `datasets` folder or a hub id; mix several sources by weight.

Every reader is an iterator that yields one `Row` at a time, so JSONL, CSV and Parquet files are read with flat
memory however large they are (a JSON array has to be parsed whole: use JSONL for big data). Each row carries
its origin (file and line / row / item number) so every later error can name it.

A row that cannot be parsed (bad JSON line, wrong field count) is yielded with `error` set instead of stopping
the reader: the pipeline turns it into a `RowError`, or a report line under skip_bad_rows.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ppalli.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
_FIX_FORMATS = "give a .jsonl, .json, .csv, .tsv or .parquet file, a `datasets` save_to_disk folder, or a hub id"
_PARQUET_BATCH = 1024  # rows per Arrow batch: small enough to keep memory flat, large enough to amortize calls


class RowError(DataError):
    """One row is wrong. With data.skip_bad_rows it becomes a line of the report instead of a stop."""


@dataclass(frozen=True, slots=True)
class Row:
    data: dict | None
    file: str
    unit: str  # "line" (JSONL), "row" (CSV, Parquet, datasets) or "item" (JSON array)
    number: int  # 1-based
    line: int | None = None  # where a CSV record starts (records may span lines)
    error: str | None = None

    @property
    def where(self) -> str:
        at = f" (line {self.line})" if self.line is not None and self.line != self.number else ""
        return f"{self.file} {self.unit} {self.number}{at}"


def source_kind(path: str) -> str:
    """jsonl, json, csv, tsv, parquet, datasets (a save_to_disk folder) or hub; a missing file is a DataError."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix not in SUFFIXES:
            raise DataError(f"{path}: unknown data file type '{suffix}'; {_FIX_FORMATS}")
        return SUFFIXES[suffix]
    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "datasets"
        raise DataError(f"{path}: a folder but not a `datasets` save_to_disk folder; {_FIX_FORMATS}")
    if suffix in SUFFIXES or p.is_absolute() or path.startswith(".") or path.count("/") != 1:
        raise DataError(f"data file not found: {path} (check data.path; {_FIX_FORMATS})")
    return "hub"


def read_rows(path: str, *, split: str = "train", streaming: bool = True) -> Iterator[Row]:
    """Rows of one source in file order. Raises DataError at once for a missing file, at the end for an empty one.

    streaming only matters for hub ids (`datasets` streaming mode); files are always read lazily.
    """
    kind = source_kind(path)
    if kind in ("jsonl", "json", "parquet"):
        rows = {"jsonl": _jsonl, "json": _json, "parquet": _parquet}[kind](path)
    elif kind in ("csv", "tsv"):
        rows = _csv(path, "\t" if kind == "tsv" else ",")
    else:
        rows = _datasets(path, split, streaming, kind == "hub")
    return _require_rows(rows, path)


def _require_rows(rows: Iterator[Row], path: str) -> Iterator[Row]:
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError(f"{path}: no rows in it; fill the file or point data.path at another one")


def _jsonl(path: str) -> Iterator[Row]:
    # Binary lines decoded one by one: a bad byte names its line, and nothing but the current line is held.
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            yield _jsonl_row(raw, path, number)


def _jsonl_row(raw: bytes, path: str, number: int) -> Row:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Row(None, path, "line", number, error=f"not UTF-8 ({e.reason} at byte {e.start}); save the file "
                                                     "as UTF-8")
    except json.JSONDecodeError as e:
        return Row(None, path, "line", number, error=f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(data, dict):
        return Row(None, path, "line", number, error=f"expected a JSON object {{...}}, got {type(data).__name__}")
    return Row(data, path, "line", number)


def _json(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix the file, or write one object "
                        "per line as .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, got "
                        f"{type(data).__name__}; reshape the file or write it as .jsonl")
    for number, item in enumerate(data, start=1):
        if isinstance(item, dict):
            yield Row(item, path, "item", number)
        else:
            yield Row(None, path, "item", number, error=f"expected a JSON object {{...}}, got {type(item).__name__}")


def _csv(path: str, delimiter: str) -> Iterator[Row]:
    # Fields such as whole dialogues exceed csv's default 128 KiB field limit; 2**31-1 fits a C long everywhere.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    number = 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            width = len(reader.fieldnames or ())  # reads the header, so line_num counts it
            start = reader.line_num + 1
            for record in reader:
                number += 1
                yield _csv_row(record, path, number, start, width)
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise DataError(f"{path} row {number + 1}: not UTF-8 ({e.reason}); files saved by Excel in Korean are "
                        "often CP949: convert with `iconv -f cp949 -t utf-8 in.csv > out.csv`") from None
    except csv.Error as e:
        raise DataError(f"{path} row {number + 1}: not valid CSV ({e}); fix the quoting of that row") from None


def _csv_row(record: dict, path: str, number: int, line: int, width: int) -> Row:
    if None in record:  # DictReader files surplus fields under the key None
        got = width + len(record[None])
        return Row(None, path, "row", number, line, error=f"has {got} fields, the header has {width}; quote "
                                                          "fields that contain the delimiter")
    if any(v is None for v in record.values()):  # missing trailing fields come back as None
        got = sum(v is not None for v in record.values())
        return Row(None, path, "row", number, line, error=f"has {got} fields, the header has {width}")
    return Row(record, path, "row", number, line)


def _parquet(path: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield Row(record, path, "row", number)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); re-export it with pandas or pyarrow") from None


def _datasets(path: str, split: str, streaming: bool, hub: bool) -> Iterator[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` folder or hub id needs the datasets package: "
                        "pip install 'ppalli[data]'") from None
    ds = _open_dataset(datasets, path, split, streaming, hub)
    for number, record in enumerate(ds, start=1):
        yield Row(dict(record), path, "row", number)


def _open_dataset(datasets, path: str, split: str, streaming: bool, hub: bool):  # noqa: ANN001 - the lazily imported module
    try:
        ds = (datasets.load_dataset(path, split=split, streaming=streaming) if hub
              else datasets.load_from_disk(path))
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot load it as a dataset ({first}); check data.path and "
                        "data.sources[].split") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (it has {', '.join(ds)}); set the source's split")
        ds = ds[split]
    return ds


class Mix:
    """Interleave several row streams by weight, deterministically for a seed.

    Each next row comes from source i with probability w_i / sum(w). The mix ends when any source runs out, so
    the rows used keep the weights' proportions (weights 1:1 over 100 and 10,000 rows give about 100 of each);
    `used` counts the rows taken from each source, and `ended_by` names the source that ran out.
    """

    def __init__(self, streams: list[Iterable], weights: list[float], seed: int):
        if len(streams) != len(weights):
            raise ValueError("one weight per stream")
        bad = [w for w in weights if not w > 0]
        if bad:
            raise DataError(f"data.sources[].weight: must be above 0, got {bad[0]}; drop the source instead")
        self.streams, self.weights, self.seed = streams, weights, seed
        self.used = [0] * len(streams)
        self.ended_by: int | None = None

    def __iter__(self) -> Iterator:
        if len(self.streams) == 1:  # one source: every row, no draws
            for item in self.streams[0]:
                self.used[0] += 1
                yield item
            return
        rng = random.Random(self.seed)
        iterators = [iter(s) for s in self.streams]
        picks = range(len(iterators))
        while True:
            i = rng.choices(picks, weights=self.weights)[0]
            try:
                item = next(iterators[i])
            except StopIteration:
                self.ended_by = i
                return
            self.used[i] += 1
            yield item
