"""Any interactions CSV, with optional items and users files → `RawData`.

`CsvSpec` mirrors the importer's command-line flags one to one (`FLAGS`). A column that is not
given switches off what needs it, with a note in the report: no rating → every interaction is
a like; no time → no time-based split; no author → no author channel; no region → no geo
channel. With a rating column and no `like_threshold`, a like is a rating in the upper 40% of
the observed scale: threshold = min + 0.6 × (max − min), e.g. 3.4 on 1–5 (4 and 5 are likes),
6.4 on 1–10.

Real files are messy, and a bad row never ends in a traceback: it is dropped and counted in
the report under a reason, checked in this order (a row is counted once, for its first fault):

1. `malformed line (more fields than the header)`;
2. `missing user or item id` (after stripping spaces and stray quotes; "", "NA", "null", … are missing);
3. `missing rating`, then `rating not a number`;
4. `missing time`, then `unparseable time`;
5. `duplicate (user, item), kept latest` (by time; without time the last row is kept).

Encoding: UTF-8 (a BOM is skipped) unless the file does not decode, then Latin-1; or
`--encoding`. Delimiter: sniffed among `, ; TAB |` (default `,`), or `--delimiter`. Time values
are unix seconds (int or float; values above 1e11 are taken as milliseconds) or date strings:
ISO-8601 first, then any format pandas recognises (month first when ambiguous); dates without
a zone are UTC. Ids are kept as text, exactly as written once stripped.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import pandas as pd

from training.data.paths import describe_files, relative_name
from training.data.raw import (
    LoadReport,
    RawData,
    clean_strings,
    clean_text,
    complete_items,
    complete_users,
    drop_duplicate_ids,
    drop_duplicate_interactions,
    interactions_frame,
    items_frame,
    users_frame,
)

NAME: Final = "csv"
LIKE_UPPER_SHARE: Final = 0.4
DELIMITER_CANDIDATES: Final = ",;\t|"
MILLISECONDS_ABOVE: Final = 1e11  # as unix seconds, 1e11 is the year 5138
_SAMPLE_BYTES: Final = 1 << 16
_SPARE_COLUMN: Final = "\0spare"
# Id columns of the metadata files default to the interactions' id columns.
_DEFAULTS: Final = {"item_id_col": "item_col", "user_id_col": "user_col"}

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]

# Every CsvSpec field and the command-line flag that sets it: errors name the flag.
FLAGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "interactions": "--interactions",
        "user_col": "--user-col",
        "item_col": "--item-col",
        "rating_col": "--rating-col",
        "like_threshold": "--like-threshold",
        "time_col": "--time-col",
        "items": "--items",
        "item_id_col": "--item-id-col",
        "title_col": "--title-col",
        "categories_col": "--categories-col",
        "categories_sep": "--categories-sep",
        "author_col": "--author-col",
        "item_time_col": "--item-time-col",
        "publisher_col": "--publisher-col",
        "users": "--users",
        "user_id_col": "--user-id-col",
        "region_col": "--region-col",
        "delimiter": "--delimiter",
        "encoding": "--encoding",
    }
)


@dataclass(frozen=True)
class CsvSpec:
    """Where the data is and which columns mean what. `item_id_col` and `user_id_col` default to
    `item_col` and `user_col`; `delimiter` and `encoding` are detected when None."""

    interactions: Path
    user_col: str
    item_col: str
    rating_col: str | None = None
    like_threshold: float | None = None
    time_col: str | None = None
    items: Path | None = None
    item_id_col: str | None = None
    title_col: str | None = None
    categories_col: str | None = None
    categories_sep: str = "|"
    author_col: str | None = None
    item_time_col: str | None = None
    publisher_col: str | None = None
    users: Path | None = None
    user_id_col: str | None = None
    region_col: str | None = None
    delimiter: str | None = None
    encoding: str | None = None


class CsvSpecError(ValueError):
    """The spec does not fit the files; the message starts with the flag to fix."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.flag = FLAGS[field]
        self.problem = problem
        super().__init__(f"{self.flag}: {problem}")


@dataclass
class _Table:
    """One file read: its wanted columns (by spec field) as text, and how it was read."""

    columns: dict[str, pd.Series]
    encoding: str
    delimiter: str


def load_csv(spec: CsvSpec) -> RawData:
    """Read the files named by `spec` into `RawData`; see the module docstring for the rules."""
    _check_spec(spec)
    report = LoadReport()
    paths = [path for path in (spec.interactions, spec.items, spec.users) if path is not None]
    base = Path(os.path.commonpath([path.resolve().parent for path in paths]))
    read_as: dict[str, dict[str, str]] = {}

    wanted = {"user_col": spec.user_col, "item_col": spec.item_col}
    wanted |= {key: value for key in ("rating_col", "time_col") if (value := getattr(spec, key)) is not None}
    table = _read_table(spec, "interactions", wanted, report, base)
    read_as[relative_name(spec.interactions, base)] = {
        "encoding": table.encoding,
        "delimiter": table.delimiter,
    }
    interactions = _interactions(spec, table, report)
    interactions = drop_duplicate_interactions(interactions, report)
    if interactions.empty:
        dropped = "; ".join(f"{reason}: {count:,}" for reason, count in report.dropped.items())
        raise CsvSpecError(
            "interactions",
            f"no usable interactions in {spec.interactions.name} ({dropped or 'no data rows'})",
        )

    has_rating = spec.rating_col is not None
    like_threshold = _like_threshold(spec, interactions, report) if has_rating else None
    if not has_rating:
        report.note("no rating column (--rating-col): every interaction counts as a like")
    if spec.time_col is None:
        report.note("no time column (--time-col): no recency features, evaluation uses a random split")

    items, has_categories, has_authors = _items(spec, report, base, read_as)
    users, has_regions = _users(spec, report, base, read_as)
    items = complete_items(items, interactions, report)
    users = complete_users(users, interactions, report)

    parameters: dict[str, Any] = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(spec).items()
    }
    parameters["like_threshold"] = like_threshold
    parameters["read_as"] = read_as
    return RawData(
        name=NAME,
        interactions=interactions,
        items=items,
        users=users,
        like_threshold=like_threshold,
        has_rating=has_rating,
        has_time=spec.time_col is not None,
        has_authors=has_authors,
        has_categories=has_categories,
        has_regions=has_regions,
        report=report,
        source={"dataset": NAME, "files": describe_files(paths, base), "parameters": parameters},
    )


# --- the spec -----------------------------------------------------------------------------------


def _check_spec(spec: CsvSpec) -> None:
    for field in ("user_col", "item_col"):
        if not str(getattr(spec, field)).strip():
            raise CsvSpecError(field, "must name a column")
    if spec.like_threshold is not None and spec.rating_col is None:
        raise CsvSpecError(
            "like_threshold", "needs --rating-col (without ratings every interaction is a like)"
        )
    if spec.like_threshold is not None and not np.isfinite(spec.like_threshold):
        raise CsvSpecError("like_threshold", f"must be a finite number, got {spec.like_threshold}")
    for field in (
        "item_id_col",
        "title_col",
        "categories_col",
        "author_col",
        "item_time_col",
        "publisher_col",
    ):
        if getattr(spec, field) is not None and spec.items is None:
            raise CsvSpecError(field, "needs --items (the file that has this column)")
    for field in ("user_id_col", "region_col"):
        if getattr(spec, field) is not None and spec.users is None:
            raise CsvSpecError(field, "needs --users (the file that has this column)")
    if not spec.categories_sep:
        raise CsvSpecError("categories_sep", "must not be empty")
    if spec.delimiter is not None and len(_delimiter_from_flag(spec.delimiter)) != 1:
        raise CsvSpecError("delimiter", f"must be one character (or 'tab'), got {spec.delimiter!r}")
    if spec.encoding is not None:
        try:
            codecs.lookup(spec.encoding)
        except LookupError:
            raise CsvSpecError("encoding", f"unknown encoding {spec.encoding!r}") from None


def _delimiter_from_flag(value: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(value, value)


# --- reading one file -----------------------------------------------------------------------------


def _read_table(
    spec: CsvSpec, file_field: str, wanted: dict[str, str], report: LoadReport, base: Path
) -> _Table:
    """Read the columns `wanted` ({spec field: column name}) of the file `spec.<file_field>`
    as stripped text; malformed lines are dropped and counted under `file_field`."""
    path: Path = getattr(spec, file_field)
    if not path.exists():
        raise CsvSpecError(file_field, f"no such file: {path}")
    if not path.is_file():
        raise CsvSpecError(file_field, f"not a file: {path}")
    encoding = spec.encoding or _detect_encoding(path)
    if spec.encoding is None and encoding == "latin-1":
        report.note(f"{path.name}: not valid UTF-8, read as Latin-1")
    lines = _sample_lines(path, encoding)
    header_index = next((index for index, line in enumerate(lines) if line.strip()), None)
    if header_index is None:
        raise CsvSpecError(file_field, f"{path.name} is empty (no header row)")
    delimiter = (
        _delimiter_from_flag(spec.delimiter)
        if spec.delimiter is not None
        else _sniff_delimiter(lines[header_index : header_index + 50])
    )
    header = [_clean_header(name) for name in next(csv.reader([lines[header_index]], delimiter=delimiter))]
    found = [name for name in header if name]
    for field, column in wanted.items():
        if column.strip() not in found:
            defaulted = (
                f" ({FLAGS[field]} defaults to {FLAGS[_DEFAULTS[field]]})"
                if field in _DEFAULTS and getattr(spec, field) is None
                else ""
            )
            listed = _listing(found)
            raise CsvSpecError(
                field, f"column {column!r} not in {path.name}{defaulted}; columns found: {listed}"
            )
    # Positional names: a header may repeat a name or leave one empty; one spare column catches
    # rows with more fields than the header.
    names = [f"\0column {index}" for index in range(len(header))] + [_SPARE_COLUMN]
    position = {name: index for index, name in reversed(list(enumerate(header))) if name}
    use = {field: names[position[column.strip()]] for field, column in wanted.items()}
    columns = sorted({*use.values(), _SPARE_COLUMN}, key=names.index)
    frame, skipped, quoting_off = _parse(
        path, file_field, encoding, delimiter, header_index + 1, names, columns
    )
    if quoting_off:
        report.note(
            f"{path.name}: unbalanced quotes, read without quote handling (quotes stripped from values)"
        )
    overflow = frame[_SPARE_COLUMN].fillna("").str.strip().ne("").to_numpy()
    report.rows_read[relative_name(path, base)] = len(frame) + skipped
    report.drop(f"{file_field}: malformed line (more fields than the header)", skipped + int(overflow.sum()))
    kept = frame[~overflow].reset_index(drop=True)
    return _Table({field: kept[name] for field, name in use.items()}, encoding, delimiter)


def _listing(names: list[str], limit: int = 30) -> str:
    """Column names for an error message, shortened when the header is not what it seems."""
    shown = [name if len(name) <= 40 else name[:37] + "..." for name in names[:limit]]
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return (", ".join(shown) or "(none)") + more


def _detect_encoding(path: Path) -> str:
    """UTF-8 (BOM skipped) when the whole file decodes, else Latin-1 (which always decodes)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as stream:
        try:
            while block := stream.read(1 << 22):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8-sig"


def _sample_lines(path: Path, encoding: str) -> list[str]:
    with path.open("rb") as stream:
        raw = stream.read(_SAMPLE_BYTES)
        truncated = bool(stream.read(1))
    text = raw.decode(encoding, errors="replace").lstrip("\ufeff")
    text = text.removeprefix("ï»¿")  # a UTF-8 BOM decoded as Latin-1
    lines = re.split(r"\r\n|\n|\r", text)
    return lines[:-1] if truncated and len(lines) > 1 else lines


def _sniff_delimiter(lines: list[str]) -> str:
    sample = "\n".join(lines)
    try:
        delimiter = csv.Sniffer().sniff(sample, delimiters=DELIMITER_CANDIDATES).delimiter
    except csv.Error:
        delimiter = ","
    if delimiter not in lines[0]:
        counts = {candidate: lines[0].count(candidate) for candidate in DELIMITER_CANDIDATES}
        best = max(counts, key=lambda candidate: counts[candidate])
        delimiter = best if counts[best] else ","
    return delimiter


def _clean_header(name: str) -> str:
    return name.strip().strip("\"'").strip().lstrip("\ufeff")


def _parse(
    path: Path,
    file_field: str,
    encoding: str,
    delimiter: str,
    skip: int,
    names: list[str],
    columns: list[str],
) -> tuple[pd.DataFrame, int, bool]:
    """(the `columns` of the file, lines skipped as malformed, whether quote handling had to be
    switched off). All columns are parsed: pandas refuses `usecols` naming the spare column
    when no row reaches it."""
    for quoting in (csv.QUOTE_MINIMAL, csv.QUOTE_NONE):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            try:
                frame = pd.read_csv(
                    path,
                    sep=delimiter,
                    header=None,
                    skiprows=skip,
                    names=names,
                    dtype=str,
                    na_filter=False,
                    index_col=False,
                    on_bad_lines="warn",
                    encoding=encoding,
                    quoting=quoting,
                    engine="c",
                )
            except pd.errors.EmptyDataError:
                return pd.DataFrame({name: pd.Series([], dtype="str") for name in columns}), 0, False
            except pd.errors.ParserError:
                continue
            except UnicodeDecodeError as error:
                raise CsvSpecError("encoding", f"{path.name} is not valid {encoding}: {error}") from None
        skipped = sum(str(warning.message).count("Skipping line") for warning in caught)
        return frame[columns], skipped, quoting == csv.QUOTE_NONE
    raise CsvSpecError(file_field, f"{path.name}: cannot be parsed as CSV")  # pragma: no cover


# --- interactions ---------------------------------------------------------------------------------


def _interactions(spec: CsvSpec, table: _Table, report: LoadReport) -> pd.DataFrame:
    user_id = clean_strings(table.columns["user_col"])
    item_id = clean_strings(table.columns["item_col"])
    dropped = np.array(user_id.isna() | item_id.isna(), dtype=bool)
    report.drop("interactions: missing user or item id", int(dropped.sum()))

    rating: FloatArray | None = None
    if spec.rating_col is not None:
        rating, missing = _numbers(table.columns["rating_col"])
        missing &= ~dropped
        report.drop("interactions: missing rating", int(missing.sum()))
        not_number = ~dropped & ~missing & np.isnan(rating)
        report.drop("interactions: rating not a number", int(not_number.sum()))
        dropped |= missing | not_number

    timestamp: FloatArray | None = None
    if spec.time_col is not None:
        timestamp, missing, milliseconds = parse_times(table.columns["time_col"])
        missing &= ~dropped
        report.drop("interactions: missing time", int(missing.sum()))
        unparseable = ~dropped & ~missing & np.isnan(timestamp)
        report.drop("interactions: unparseable time", int(unparseable.sum()))
        dropped |= missing | unparseable
        if milliseconds:
            report.note(f"interactions: {milliseconds:,} time values read as unix milliseconds")

    keep = ~dropped
    return interactions_frame(
        user_id[keep],
        item_id[keep],
        None if rating is None else rating[keep],
        None if timestamp is None else np.floor(timestamp[keep]),
    )


def _numbers(values: pd.Series) -> tuple[FloatArray, BoolArray]:
    """(numbers, missing): finite numbers, NaN where missing or not a number. Clean values are
    parsed at C speed; only the rest are stripped of stray quotes and parsed again."""
    numbers = _finite(pd.to_numeric(values, errors="coerce"))
    missing = np.zeros(len(numbers), dtype=bool)
    retry = np.isnan(numbers)
    if retry.any():
        cleaned = clean_strings(values[retry])
        missing[retry] = cleaned.isna().to_numpy()
        numbers[retry] = _finite(pd.to_numeric(cleaned, errors="coerce"))
    return numbers, missing


def parse_times(values: pd.Series) -> tuple[FloatArray, BoolArray, int]:
    """(unix seconds, missing, count read as milliseconds) from unix seconds or date strings;
    seconds are NaN where the value is missing or unparseable. Numbers, then ISO-8601 dates, are
    parsed at C speed; only what is left is cleaned and tried in any date format."""
    seconds = _finite(pd.to_numeric(values, errors="coerce"))
    numeric = ~np.isnan(seconds)
    missing = np.zeros(len(seconds), dtype=bool)
    rest = ~numeric
    if rest.any():
        seconds[rest] = _date_seconds(values[rest], "ISO8601")
        rest = np.isnan(seconds)
    if rest.any():
        text = clean_strings(values[rest])
        missing[rest] = text.isna().to_numpy()
        retried = _finite(pd.to_numeric(text, errors="coerce"))
        numeric[rest] = ~np.isnan(retried)
        dates = np.isnan(retried) & text.notna().to_numpy()
        if dates.any():
            retried[dates] = _date_seconds(text[dates], "ISO8601")
            unparsed = np.isnan(retried) & dates
            if unparsed.any():
                retried[unparsed] = _date_seconds(text[unparsed], "mixed")
        seconds[rest] = retried
    milliseconds = numeric & (np.abs(seconds) > MILLISECONDS_ABOVE)
    seconds[milliseconds] /= 1000.0
    return seconds, missing, int(milliseconds.sum())


def _date_seconds(text: pd.Series, date_format: str) -> FloatArray:
    """Unix seconds of date strings (NaN where unparseable); dates without a zone are UTC."""
    with warnings.catch_warnings():
        # "mixed" reads 13/04/2021 day first with a warning; that is what we want.
        warnings.simplefilter("ignore", UserWarning)
        parsed = pd.to_datetime(text, format=date_format, errors="coerce", utc=True)
    seconds = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return np.array(seconds, dtype=np.float64)


def _finite(values: Any) -> FloatArray:
    numbers = np.array(values, dtype=np.float64)
    numbers[~np.isfinite(numbers)] = np.nan
    return numbers


def _like_threshold(spec: CsvSpec, interactions: pd.DataFrame, report: LoadReport) -> float:
    if spec.like_threshold is not None:
        return float(spec.like_threshold)
    ratings = interactions["rating"]
    low, high = float(ratings.min()), float(ratings.max())
    threshold = round(low + (1 - LIKE_UPPER_SHARE) * (high - low), 6)
    report.note(
        f"like threshold {threshold:g}: the upper {LIKE_UPPER_SHARE:.0%} of the observed rating scale "
        f"{low:g}–{high:g} (--like-threshold to override)"
    )
    return threshold


# --- items and users ---------------------------------------------------------------------------------


def _items(
    spec: CsvSpec, report: LoadReport, base: Path, read_as: dict[str, dict[str, str]]
) -> tuple[pd.DataFrame, bool, bool]:
    """(items frame, has_categories, has_authors)."""
    if spec.items is None:
        report.note("no items file (--items): no titles, categories, authors or item times")
        return items_frame(pd.Series([], dtype="str")), False, False
    wanted = {"item_id_col": spec.item_id_col or spec.item_col}
    optional = ("title_col", "categories_col", "author_col", "item_time_col", "publisher_col")
    wanted |= {field: value for field in optional if (value := getattr(spec, field)) is not None}
    table = _read_table(spec, "items", wanted, report, base)
    read_as[relative_name(spec.items, base)] = {"encoding": table.encoding, "delimiter": table.delimiter}
    item_id = clean_strings(table.columns["item_id_col"])
    report.drop("items: missing item id", int(item_id.isna().sum()))
    keep = item_id.notna().to_numpy()
    columns = {field: values[keep].reset_index(drop=True) for field, values in table.columns.items()}

    titles = clean_text(columns["title_col"]) if spec.title_col else None
    categories = None
    if spec.categories_col is not None:
        categories = _split_categories(clean_strings(columns["categories_col"]), spec.categories_sep)
    authors = clean_text(columns["author_col"]) if spec.author_col else None
    publishers = clean_text(columns["publisher_col"]) if spec.publisher_col else None
    item_time = None
    if spec.item_time_col is not None:
        item_time, missing, _ = parse_times(columns["item_time_col"])
        unparseable = int((~missing & np.isnan(item_time)).sum())
        if unparseable:
            report.note(f"items: {unparseable:,} unparseable item times left unknown")
    items = items_frame(
        item_id[keep],
        title=titles,
        categories=categories,
        author=authors,
        item_time=item_time,
        publisher=publishers,
    )
    items = drop_duplicate_ids(items, "item_id", report)

    if spec.title_col is None:
        report.note("no title column (--title-col): titles are empty")
    if spec.item_time_col is None:
        report.note("no item time column (--item-time-col): item ages unknown")
    has_categories = spec.categories_col is not None and bool(items["categories"].map(len).gt(0).any())
    has_authors = spec.author_col is not None and bool(items["author"].notna().any())
    if spec.categories_col is None:
        report.note("no categories column (--categories-col): no categories")
    elif not has_categories:
        report.note("categories column has no values: no categories")
    if spec.author_col is None:
        report.note("no author column (--author-col): no author channel")
    elif not has_authors:
        report.note("author column has no values: no author channel")
    return items, has_categories, has_authors


def _split_categories(values: pd.Series, separator: str) -> list[list[str]]:
    result: list[list[str]] = []
    for value in values:
        if pd.isna(value):
            result.append([])
            continue
        parts = (part.strip(" \t\"'") for part in str(value).split(separator))
        result.append(list(dict.fromkeys(part for part in parts if part)))
    return result


def _users(
    spec: CsvSpec, report: LoadReport, base: Path, read_as: dict[str, dict[str, str]]
) -> tuple[pd.DataFrame, bool]:
    """(users frame, has_regions)."""
    if spec.users is None:
        report.note("no users file (--users): no regions, no geo channel")
        return users_frame(pd.Series([], dtype="str")), False
    wanted = {"user_id_col": spec.user_id_col or spec.user_col}
    if spec.region_col is not None:
        wanted["region_col"] = spec.region_col
    table = _read_table(spec, "users", wanted, report, base)
    read_as[relative_name(spec.users, base)] = {"encoding": table.encoding, "delimiter": table.delimiter}
    user_id = clean_strings(table.columns["user_id_col"])
    report.drop("users: missing user id", int(user_id.isna().sum()))
    keep = user_id.notna().to_numpy()
    region = clean_text(table.columns["region_col"])[keep] if spec.region_col is not None else None
    users = drop_duplicate_ids(users_frame(user_id[keep], region), "user_id", report)
    has_regions = spec.region_col is not None and bool(users["region"].notna().any())
    if spec.region_col is None:
        report.note("no region column (--region-col): no geo channel")
    elif not has_regions:
        report.note("region column has no values: no geo channel")
    return users, has_regions
