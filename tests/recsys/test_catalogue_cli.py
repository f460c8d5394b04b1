"""`recsys catalogue add FILE` and `withdraw`: reading CSV and JSON Lines catalogues, and bad
input as one line naming the flag (or the file, line and field) with no traceback. The calls
against a running gateway are in tests/services/gateway/test_new_items.py."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.client import CatalogueItem
from recsys.commands.catalogue import read_items
from recsys.errors import UsageError


def test_a_csv_catalogue_reads_every_column(tmp_path: Path) -> None:
    path = tmp_path / "books.csv"
    path.write_text(
        "item_id,title,author,categories,publisher,published_at\n"
        'b-1,"Dune, Part One",Frank Herbert,SF|Classics ,Chilton,1965\n'
        "b-2,Untitled,,,,2024-05-01T12:00:00+02:00\n"
        "b-3,Plain,Someone,Essays,,1714550400\n",
        encoding="utf-8",
    )
    items = read_items(path, None, "|")
    assert items == [
        CatalogueItem(
            "b-1",
            "Dune, Part One",
            "Frank Herbert",
            ("SF", "Classics"),
            "Chilton",
            dt.datetime(1965, 1, 1, tzinfo=dt.UTC).timestamp(),
        ),
        CatalogueItem("b-2", "Untitled", "", (), "", dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC).timestamp()),
        CatalogueItem("b-3", "Plain", "Someone", ("Essays",), "", 1_714_550_400.0),
    ]


def test_a_jsonl_catalogue_takes_lists_or_strings_of_categories(tmp_path: Path) -> None:
    path = tmp_path / "books.jsonl"
    rows = [
        {"item_id": "j-1", "title": "Ü", "categories": ["a", "b"], "published_at": "2020-01-02"},
        {"item_id": "j-2", "categories": "x|y"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    items = read_items(path, None, "|")
    assert items[0] == CatalogueItem(
        "j-1", "Ü", "", ("a", "b"), "", dt.datetime(2020, 1, 2, tzinfo=dt.UTC).timestamp()
    )
    assert items[1] == CatalogueItem("j-2", categories=("x", "y"))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "title\nx\n", "the header must name an item_id column"),
        ("a.csv", "item_id,title\n,x\n", "line 2: item_id: missing or empty"),
        ("a.csv", "item_id,published_at\nb,last tuesday\n", "line 2: published_at: expected unix seconds"),
        ("a.csv", "item_id,published_at\nb,1969-07-20\n", "line 2: published_at: must not be before 1970"),
        ("a.csv", "item_id,colour\nb,red\n", "line 2: unknown field 'colour'"),
        ("a.csv", "item_id\n", "no items"),
        ("a.jsonl", '{"item_id": "a"}\n{oops\n', "line 2: not JSON"),
        ("a.jsonl", '["a"]\n', "line 1: expected an object"),
        ("a.txt", "item_id\nb\n", "--format: cannot tell from the suffix"),
    ],
)
def test_bad_files_name_the_line_and_the_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as raised:
        read_items(path, None, "|")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("catalogue",), "the following arguments are required: ACTION"),
        (("catalogue", "add"), "the following arguments are required: FILE"),
        (("catalogue", "add", "items.csv", "--batch-size", "0"), "--batch-size: must be in 1 … 1000, got 0"),
        (("catalogue", "add", "missing.csv"), "FILE: "),
        (("catalogue", "add", "items.csv", "--format", "xml"), "--format: invalid choice: 'xml'"),
        (("catalogue", "withdraw"), "the following arguments are required: ID"),
        (("catalogue", "withdraw", " "), "ID: must not be empty"),
    ],
)
def test_usage_errors_are_one_line_naming_the_flag(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    (tmp_path / "items.csv").write_text("item_id\nb-1\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args, "--addr", "127.0.0.1:1"]
        if len(args) > 2
        else [sys.executable, "-m", "recsys.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    if "usage:" not in result.stderr:  # argparse's own errors print the usage first
        assert result.stderr.count("\n") == 1
