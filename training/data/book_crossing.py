"""The Book-Crossing subset (Ziegler et al. 2005) → `RawData`.

Files under `<data_dir>/book-crossing-subset/`: `BX-Ratings.csv` (User-ID, ISBN, Book-Rating
1–10), `BX-Books.csv` (ISBN, Book-Title, Book-Author, Year-Of-Publication, Book-Publisher),
`BX-Users.csv` (User-ID, User-City, User-State, User-Country, User-Age). No timestamps.

`BX-NewBooks*.csv` are a disjoint cold-start set (new books, their ratings and raters): they
are loaded separately by `load_book_crossing_new_books` and never mixed into `RawData`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from training.data.paths import describe_files, relative_name
from training.data.raw import (
    MISSING_TOKENS,
    LoadReport,
    RawData,
    clean_strings,
    complete_items,
    complete_users,
    drop_duplicate_ids,
    drop_duplicate_interactions,
    interactions_frame,
    items_frame,
    users_frame,
)

NAME: Final = "book-crossing"
FOLDER: Final = "book-crossing-subset"
LIKE_THRESHOLD: Final = 8.0
RATING_RANGE: Final = (1, 10)
# Publication years outside this range are placeholders (0) or typos.
YEAR_RANGE: Final = (1000, 2030)
PUBLISHER_PREFIX: Final = "publisher:"
# Place names carry stray quotes and backslashes from the original SQL dump (`' usa"'`,
# `\"n/a\".`): those are removed wherever they are, then spaces and end punctuation stripped.
_PLACE_STRIP: Final = " \t'`."


def load_book_crossing(data_dir: Path) -> RawData:
    """Load `<data_dir>/book-crossing-subset` (without the cold-start new books). ISBNs are
    stripped and upper-cased; author is Book-Author; publisher is Book-Publisher, also the
    category `publisher:<name>` (what the ranker and the diversity rules read);
    item_time is the publication year; region is `country/state` (cleaned, lower case), or
    the country alone when the state is unknown."""
    folder = data_dir / FOLDER
    files = {name: folder / name for name in ("BX-Ratings.csv", "BX-Books.csv", "BX-Users.csv")}
    _require(files.values())
    report = LoadReport()

    interactions = _ratings(_read(files["BX-Ratings.csv"], data_dir, report), report)
    items = _books(_read(files["BX-Books.csv"], data_dir, report), report)
    user_table = _read(files["BX-Users.csv"], data_dir, report)
    user_id = clean_strings(user_table["User-ID"])
    report.drop("users: missing user id", int(user_id.isna().sum()))
    known = user_id.notna().to_numpy()
    users = users_frame(user_id[known], regions(user_table["User-Country"], user_table["User-State"])[known])
    users = drop_duplicate_ids(users, "user_id", report)

    interactions = drop_duplicate_interactions(interactions, report)
    items = complete_items(items, interactions, report)
    users = complete_users(users, interactions, report)
    return RawData(
        name=NAME,
        interactions=interactions,
        items=items,
        users=users,
        like_threshold=LIKE_THRESHOLD,
        has_rating=True,
        has_time=False,
        has_authors=True,
        has_categories=True,
        has_regions=True,
        report=report,
        source={
            "dataset": NAME,
            "files": describe_files(files.values(), data_dir),
            "parameters": {"like_threshold": LIKE_THRESHOLD, "year_range": list(YEAR_RANGE)},
        },
    )


def load_book_crossing_new_books(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cold-start set: (items, interactions) from `BX-NewBooks.csv` and
    `BX-NewBooksRatings.csv`, cleaned exactly as `load_book_crossing` cleans its books and
    ratings. Many raters here have no row in any users file."""
    folder = data_dir / FOLDER
    books_path, ratings_path = folder / "BX-NewBooks.csv", folder / "BX-NewBooksRatings.csv"
    _require([books_path, ratings_path])
    report = LoadReport()
    items = _books(_read(books_path, data_dir, report), report)
    interactions = _ratings(_read(ratings_path, data_dir, report), report)
    interactions = drop_duplicate_interactions(interactions, report)
    return complete_items(items, interactions, report), interactions


def clean_place(values: pd.Series) -> pd.Series:
    """Country or state names: double quotes and backslashes removed, spaces and end punctuation
    stripped, lower case; placeholders ("", "n/a", punctuation only) become NaN."""
    text = values.astype("str").str.replace(r'["\\]', "", regex=True).str.strip(_PLACE_STRIP).str.lower()
    placeholder = text.isin(MISSING_TOKENS) | ~text.str.contains(r"[^\W_]", regex=True).fillna(False)
    return text.mask(placeholder.astype(bool))


def regions(countries: pd.Series, states: pd.Series) -> pd.Series:
    """`country/state` when both are known, the country when only it is, else NaN."""
    country = clean_place(countries).reset_index(drop=True)
    state = clean_place(states).reset_index(drop=True)
    both = country.notna() & state.notna()
    return country.where(~both, country + "/" + state)


def _require(paths: Iterable[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{NAME}: missing {path} (is --data-dir right?)")


def _read(path: Path, data_dir: Path, report: LoadReport) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    frame.columns = [str(column).strip() for column in frame.columns]
    report.rows_read[relative_name(path, data_dir)] = len(frame)
    return frame


def _isbns(values: pd.Series) -> pd.Series:
    return clean_strings(values).str.upper()


def _ratings(table: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
    user_id = clean_strings(table["User-ID"])
    item_id = _isbns(table["ISBN"])
    rating = pd.to_numeric(clean_strings(table["Book-Rating"]), errors="coerce")
    missing_id = user_id.isna() | item_id.isna()
    report.drop("interactions: missing user id or ISBN", int(missing_id.sum()))
    bad_rating = ~missing_id & ~rating.between(*RATING_RANGE)
    report.drop("interactions: rating missing or outside 1–10", int(bad_rating.sum()))
    keep = (~(missing_id | bad_rating)).to_numpy()
    return interactions_frame(user_id[keep], item_id[keep], rating[keep], None)


def _books(table: pd.DataFrame, report: LoadReport) -> pd.DataFrame:
    item_id = _isbns(table["ISBN"])
    report.drop("items: missing ISBN", int(item_id.isna().sum()))
    keep = item_id.notna().to_numpy()
    table, item_id = table[keep], item_id[keep]
    publisher = clean_strings(table["Book-Publisher"], strip=" \t\r\n")
    categories = [[] if pd.isna(name) else [PUBLISHER_PREFIX + name] for name in publisher]
    year = pd.to_numeric(clean_strings(table["Year-Of-Publication"]), errors="coerce")
    year = year.where((year > YEAR_RANGE[0]) & (year <= YEAR_RANGE[1]), np.nan)
    items = items_frame(
        item_id,
        title=table["Book-Title"].astype("str").str.strip(),
        categories=categories,
        author=clean_strings(table["Book-Author"], strip=" \t\r\n"),
        item_time=year,
        publisher=publisher,
    )
    # Upper-casing merges ISBNs that differ only in the case of the check digit "x".
    return drop_duplicate_ids(items, "item_id", report, "items: duplicate ISBN once upper-cased, kept last")
