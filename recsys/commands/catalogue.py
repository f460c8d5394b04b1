"""`recsys catalogue add FILE` and `recsys catalogue withdraw ID...`: the live catalogue of a
running gateway (`recsys.v1.CatalogueService`), through `recsys.client`.

FILE is CSV (a header row) or JSON Lines (one object per line), told apart by `--format` or
the file's suffix (.csv / .jsonl, .ndjson). Columns or keys: `item_id` (required), `title`,
`author`, `categories` (CSV: one cell, split on `--categories-sep`, `|` by default; JSON: a
list or such a string), `publisher`, `published_at` (unix seconds, a year, or an ISO 8601
date or time; UTC unless it says otherwise). The file is read and checked whole before
anything is sent, and sent in batches of `--batch-size`: a bad line is one error naming the
file, the line and the field, and nothing is upserted.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from recsys.commands.client import DEFAULT_ADDR, _as_json, _client, _failed, add_tls_arguments, default_addr
from recsys.errors import UsageError

COLUMNS = ("item_id", "title", "author", "categories", "publisher", "published_at")
MAX_BATCH = 1000  # the gateway's default `max_catalogue_items`
MAX_FILE_BYTES = 256 * 1024**2  # a catalogue file is read whole before anything is sent


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    catalogue = commands.add_parser(
        "catalogue",
        help="add or withdraw items of a running gateway's live catalogue",
        description="Items upserted or withdrawn while serving (CatalogueService); served "
        "within the services' catalogue poll interval (2 s by default), no restart or build.",
    )
    actions = catalogue.add_subparsers(dest="action", metavar="ACTION", title="actions")
    actions.required = True

    add = actions.add_parser("add", help="upsert the items of a CSV or JSONL file", description=__doc__)
    add.add_argument("file", type=Path, metavar="FILE", help="items: CSV with a header, or JSON Lines")
    add.add_argument("--format", choices=("csv", "jsonl"), help="default: from FILE's suffix")
    add.add_argument("--categories-sep", default="|", help="separator of the CSV categories cell (default |)")
    add.add_argument("--delimiter", default=",", help="CSV field delimiter (default ,)")
    add.add_argument("--batch-size", type=int, default=500, help=f"items per call, 1 … {MAX_BATCH}")
    _common(add)
    add.set_defaults(handler=run_add)

    withdraw = actions.add_parser(
        "withdraw", help="withdraw items (upserted or the model's own) from every answer"
    )
    withdraw.add_argument("item_ids", nargs="+", metavar="ID", help="external item ids")
    _common(withdraw)
    withdraw.set_defaults(handler=run_withdraw)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per call")
    parser.add_argument("--addr", default=default_addr(), help=f"gateway host:port (default {DEFAULT_ADDR})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    add_tls_arguments(parser)


def parse_time(value: Any, where: str) -> float | None:
    """`published_at` as unix seconds: a number (unix seconds, or a year below 10000), an ISO
    8601 date or date-time (UTC unless it has an offset), or empty (unknown)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise UsageError(f"{where}: published_at: expected a time, got {value!r}")
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if number != number or number in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: published_at: expected a time, got {text!r}")
        if number.is_integer() and 0 < number < 10_000:  # a year (Book-Crossing has only these)
            return dt.datetime(int(number), 1, 1, tzinfo=dt.UTC).timestamp()
        if number < 0:
            raise UsageError(f"{where}: published_at: must not be before 1970, got {text!r}")
        return number
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{where}: published_at: expected unix seconds, a year or an ISO 8601 date, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    seconds = moment.timestamp()
    if seconds < 0:
        raise UsageError(f"{where}: published_at: must not be before 1970, got {text!r}")
    return seconds


def _categories(value: Any, separator: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        names = [str(name) for name in value]
    elif isinstance(value, str):
        names = value.split(separator) if separator else [value]
    else:
        raise UsageError(f"{where}: categories: expected a list or a string, got {type(value).__name__}")
    return tuple(name.strip() for name in names if name.strip())


def _item(row: Mapping[str, Any], separator: str, where: str) -> Any:
    from recsys.client import CatalogueItem

    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(COLUMNS)})")
    item_id = row.get("item_id")
    if item_id is None or not str(item_id).strip():
        raise UsageError(f"{where}: item_id: missing or empty")
    texts = {}
    for name in ("title", "author", "publisher"):
        value = row.get(name)
        if value is not None and not isinstance(value, (str, int, float)):
            raise UsageError(f"{where}: {name}: expected text, got {type(value).__name__}")
        texts[name] = "" if value is None else str(value).strip()
    return CatalogueItem(
        item_id=str(item_id).strip(),
        categories=_categories(row.get("categories"), separator, where),
        published_at=parse_time(row.get("published_at"), where),
        **texts,
    )


def _rows(path: Path, kind: str, delimiter: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(line number, fields) of each item in the file."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UsageError(f"FILE: {path} is {size} bytes, more than {MAX_FILE_BYTES}: split it")
    text = path.read_text(encoding="utf-8-sig")
    if kind == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"FILE {path} line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"FILE {path} line {number}: expected an object, got {type(row).__name__}")
            yield number, row
        return
    if len(delimiter) != 1:
        raise UsageError(f"--delimiter: expected one character, got {delimiter!r}")
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if reader.fieldnames is None or "item_id" not in reader.fieldnames:
        known = ", ".join(COLUMNS)
        raise UsageError(f"FILE {path}: the header must name an item_id column (columns: {known})")
    for row in reader:
        if None in row:  # more cells than the header names
            raise UsageError(f"FILE {path} line {reader.line_num}: more cells than the header has columns")
        yield reader.line_num, {name: value for name, value in row.items() if value is not None}


def read_items(path: Path, kind: str | None, separator: str, delimiter: str = ",") -> list[Any]:
    """Every item of the file, checked (UsageError naming the file, line and field)."""
    if kind is None:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            kind = "csv"
        elif suffix in (".jsonl", ".ndjson"):
            kind = "jsonl"
        else:
            raise UsageError(f"--format: cannot tell from the suffix of {path.name!r}: give csv or jsonl")
    try:
        rows = _rows(path, kind, delimiter)
        items = [_item(row, separator, f"FILE {path} line {number}") for number, row in rows]
    except UnicodeDecodeError as error:
        raise UsageError(f"FILE {path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UsageError(f"FILE: {error}") from None
    if not items:
        raise UsageError(f"FILE {path}: no items")
    return items


def run_add(args: argparse.Namespace) -> int:
    from recsys.client import RecommenderError

    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size: must be in 1 … {MAX_BATCH}, got {args.batch_size}")
    items = read_items(args.file, args.format, args.categories_sep, args.delimiter)
    added = updated = 0
    with _client(args) as client:
        for start in range(0, len(items), args.batch_size):
            try:
                report = client.upsert_items(items[start : start + args.batch_size])
            except RecommenderError as error:
                raise _failed(error, args.addr) from None
            if args.json:
                print(_as_json(report.response))
            added += report.added
            updated += report.updated
    if not args.json:
        print(f"{len(items)} items from {args.file}: {added} added, {updated} updated")
    return 0


def run_withdraw(args: argparse.Namespace) -> int:
    from recsys.client import RecommenderError

    for item_id in args.item_ids:
        if not item_id.strip():
            raise UsageError("ID: must not be empty")
    with _client(args) as client:
        try:
            report = client.withdraw_items(args.item_ids)
        except RecommenderError as error:
            raise _failed(error, args.addr) from None
    if args.json:
        print(_as_json(report.response))
        return 0
    note = f"; {report.unknown} unknown to the catalogue and the current model" if report.unknown else ""
    print(f"{report.withdrawn} withdrawn, {report.already_withdrawn} already withdrawn{note}")
    return 0
