"""The offline data layer: real data sets (read from default_data_dir(), never copied), the CSV
importer on messy files written here, and the synthetic generator."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import (
    CsvSpec,
    CsvSpecError,
    LoadReport,
    RawData,
    SyntheticSpec,
    default_data_dir,
    generate_synthetic,
    load_book_crossing,
    load_book_crossing_new_books,
    load_csv,
    load_movielens_100k,
    paths,
    sha256_of,
)
from training.data.book_crossing import clean_place, regions
from training.data.csv_importer import FLAGS, parse_times
from training.data.raw import clean_text

ROOT = Path(__file__).resolve().parents[2]
MARCH_4_2021 = 1_614_816_000  # 2021-03-04T00:00:00Z


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return default_data_dir()


@pytest.fixture(scope="module")
def movielens(data_dir: Path) -> RawData:
    return load_movielens_100k(data_dir)


@pytest.fixture(scope="module")
def book_crossing(data_dir: Path) -> RawData:
    return load_book_crossing(data_dir)


def manifest_sha256(data_dir: Path, name: str) -> str:
    for line in (data_dir / "MANIFEST.txt").read_text().splitlines():
        if line.startswith(name + " "):
            return line.rsplit("sha256 ", 1)[1].strip()
    raise AssertionError(f"{name} not in MANIFEST.txt")


def check_canonical(data: RawData) -> None:
    """What every loader promises, beyond RawData's own dtype checks."""
    interactions = data.interactions
    assert not interactions.duplicated(["user_id", "item_id"]).any()
    assert set(interactions["item_id"]).issubset(set(data.items["item_id"]))
    assert set(interactions["user_id"]).issubset(set(data.users["user_id"]))
    assert data.items["item_id"].is_unique
    assert data.users["user_id"].is_unique
    assert all(isinstance(value, list) for value in data.items["categories"])
    assert data.items["author"].map(lambda value: value is None or isinstance(value, str)).all()
    assert data.users["region"].map(lambda value: value is None or isinstance(value, str)).all()
    assert data.items["title"].map(lambda value: isinstance(value, str)).all()


# --- paths -------------------------------------------------------------------------------------------


def test_default_data_dir_prefers_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECSYS_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


def test_default_data_dir_without_any_candidate_names_the_variable_and_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("RECSYS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_REPO_ROOT", tmp_path / "checkout")
    with pytest.raises(FileNotFoundError, match="RECSYS_DATA_DIR") as raised:
        default_data_dir()
    assert "--data-dir" in str(raised.value)


def test_sha256_of_matches_the_manifest(data_dir: Path):
    assert sha256_of(data_dir / "ml-100k" / "u.item") == manifest_sha256(data_dir, "ml-100k/u.item")


def test_the_data_layer_does_not_import_tensorflow():
    code = "import sys, training.data; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- LoadReport and RawData -----------------------------------------------------------------------


def test_load_report_counts_only_real_drops_and_adds_up():
    report = LoadReport(rows_read={"a.csv": 10})
    report.drop("interactions: missing rating", 0)
    report.drop("interactions: missing rating", 2)
    report.drop("interactions: missing rating", 1)
    report.notes.append("no time column: random split")
    assert report.dropped == {"interactions: missing rating": 3}
    assert report.summary_lines() == [
        "read 10 rows from a.csv",
        "dropped 3 rows: interactions: missing rating",
        "no time column: random split",
    ]


def test_raw_data_rejects_frames_that_break_the_contract(movielens: RawData):
    wrong = movielens.interactions.assign(rating=movielens.interactions["rating"].astype(np.float64))
    with pytest.raises(ValueError, match="rating must be float32"):
        dataclasses.replace(movielens, interactions=wrong)
    with pytest.raises(ValueError, match="like_threshold"):
        dataclasses.replace(movielens, like_threshold=None)


# --- MovieLens 100K -----------------------------------------------------------------------------------


def test_movielens_counts_match_the_data_readme(movielens: RawData):
    assert len(movielens.interactions) == 100_000
    assert movielens.interactions["user_id"].nunique() == len(movielens.users) == 943
    assert movielens.interactions["item_id"].nunique() == len(movielens.items) == 1_682
    assert movielens.report.rows_read == {
        "ml-100k/u.data": 100_000,
        "ml-100k/u.item": 1_682,
        "ml-100k/u.user": 943,
    }
    assert movielens.report.dropped == {}
    check_canonical(movielens)


def test_movielens_shape_and_capabilities(movielens: RawData, data_dir: Path):
    assert movielens.name == "ml-100k"
    assert list(movielens.interactions.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert movielens.interactions["timestamp"].dtype == np.int64
    assert movielens.interactions["timestamp"].between(874_000_000, 894_000_000).all()  # 1997-09 … 1998-04
    assert movielens.like_threshold == 4
    assert movielens.capabilities == {
        "rating": True,
        "time": True,
        "authors": False,
        "categories": True,
        "regions": True,
    }
    assert movielens.items["author"].isna().all()
    files = movielens.source["files"]
    assert files["ml-100k/u.data"] == {
        "bytes": 1_979_173,
        "sha256": manifest_sha256(data_dir, "ml-100k/u.data"),
    }


def test_movielens_titles_are_latin_1_and_genres_come_from_the_flags(movielens: RawData):
    items = movielens.items.set_index("item_id")
    assert items.loc["1", "title"] == "Toy Story (1995)"
    assert items.loc["1", "categories"] == ["Animation", "Children's", "Comedy"]
    assert items.loc["1", "item_time"] == 1995
    assert items.loc["543", "title"] == "Misérables, Les (1995)"
    assert items.loc["1633", "title"] == "Á köldum klaka (Cold Fever) (1994)"
    # The placeholder movie: title "unknown", only the "unknown" genre, no release date.
    assert items.loc["267", "title"] == ""
    assert items.loc["267", "categories"] == []
    assert np.isnan(items.loc["267", "item_time"])
    assert not any("unknown" in categories for categories in items["categories"])


def test_movielens_region_is_the_zip_zone(movielens: RawData):
    users = movielens.users.set_index("user_id")["region"]
    assert users["1"] == "8"  # zip 85711
    assert users["74"] == "other"  # Canadian T8H1N
    assert set(users) == {*"0123456789", "other"}
    assert (users == "other").sum() == 18


# --- Book-Crossing --------------------------------------------------------------------------------------


def test_book_crossing_counts_match_the_data_readme(book_crossing: RawData):
    assert len(book_crossing.interactions) == 204_164
    assert book_crossing.interactions["user_id"].nunique() == len(book_crossing.users) == 48_299
    assert book_crossing.items["author"].nunique() == 6_452
    # The README counts 18,185 books: the file has 039592720X and 039592720x, one book in two
    # spellings; upper-casing ISBNs merges them, so there are 18,184 distinct items.
    assert book_crossing.report.rows_read["book-crossing-subset/BX-Books.csv"] == 18_185
    assert len(book_crossing.items) == book_crossing.interactions["item_id"].nunique() == 18_184
    assert book_crossing.report.dropped == {"items: duplicate ISBN once upper-cased, kept last": 1}
    check_canonical(book_crossing)


def test_book_crossing_shape_and_capabilities(book_crossing: RawData):
    assert book_crossing.like_threshold == 8
    assert "timestamp" not in book_crossing.interactions.columns
    assert book_crossing.capabilities == {
        "rating": True,
        "time": False,
        "authors": True,
        "categories": True,
        "regions": True,
    }
    ratings = book_crossing.interactions["rating"]
    assert (ratings.min(), ratings.max()) == (1, 10)
    items = book_crossing.items.set_index("item_id")
    clara = items.loc["0002005018"]
    assert (clara["title"], clara["author"], clara["item_time"]) == (
        "Clara Callan",
        "Richard Bruce Wright",
        2001,
    )
    assert clara["categories"] == ["publisher:HarperFlamingo Canada"]
    assert clara["publisher"] == "HarperFlamingo Canada"  # the item tower's publisher input
    assert items["item_time"].dropna().between(1001, 2030).all()
    assert items["item_time"].isna().sum() == 314  # year 0 in the file


def test_book_crossing_country_cleaning_and_regions(book_crossing: RawData):
    assert clean_place(pd.Series([' usa"', ' canada"', ' n/a"', "", ' "n/a"'])).tolist()[:2] == [
        "usa",
        "canada",
    ]
    assert clean_place(pd.Series([' n/a"', "", "\\'n/a\\'", " - "])).isna().all()
    assert regions(pd.Series([' usa"', ' spain"', ""]), pd.Series([" Texas", " n/a", " ontario"])).tolist()[
        :2
    ] == [
        "usa/texas",
        "spain",
    ]
    users = book_crossing.users.set_index("user_id")["region"]
    assert users["8"] == "canada/ontario"  # 8,timmins, ontario," canada"""
    assert users["9"] == "usa/tennessee"
    assert users["212"] == "philippines"  # state n/a
    assert users["19"] is None  # no country
    assert not users.dropna().str.contains('"').any()


def test_book_crossing_new_books_are_a_separate_cold_start_set(data_dir: Path, book_crossing: RawData):
    items, interactions = load_book_crossing_new_books(data_dir)
    assert len(items) == 8_924
    assert len(interactions) == 26_772
    assert list(items.columns) == list(book_crossing.items.columns)
    assert set(interactions["item_id"]).issubset(set(items["item_id"]))
    assert not set(items["item_id"]) & set(book_crossing.items["item_id"])


# --- CSV importer -------------------------------------------------------------------------------------


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


MESSY_INTERACTIONS = (
    "\ufeffuser, movie ,stars,when,,\n"  # BOM, spaces around a name, two empty columns
    ' u1 ,"m1",4,2021-03-04,,\n'
    '"u1", m2 ,5,1614816000,,\n'  # unix seconds
    "u2,m1,2,2021-03-04T10:00:00Z,,\n"  # superseded by the later rating below
    "u2,m1,3,2021-03-05,,\n"
    "u2,m1,3,2021-03-05,,\n"  # identical duplicate row
    ",m3,4,2021-03-04,,\n"  # missing user
    "u3,,4,2021-03-04,,\n"  # missing item
    "NULL,m1,5,2021-03-04,,\n"  # missing user, spelled NULL
    "u3,m3,,2021-03-04,,\n"  # missing rating
    "u3,m3,abc,2021-03-04,,\n"  # rating not a number
    "u3,m5,4,,,\n"  # missing time
    "u3,m4,4,not a date,,\n"  # unparseable time
    "u4,m9,1,03/04/2021,,\n"  # m9 has no items row
    "u4,m1,5,2021-03-04,,,surplus\n"  # more fields than the header
    "\n"
)
MESSY_ITEMS = (  # Latin-1, semicolons
    "movie;title;genres;director;year\n"
    'm1;Café "Noir";Drama|Crime| ;Ann;1999\n'
    "m2;B;;;\n"
    'm2;"B2";Comedy;Bob ;2001-06-01\n'  # duplicate id: the last row wins
    "m7;Never rated;Drama;Ann;abc\n"  # kept though never rated; unparseable year
    ";no id;;;\n"
)
MESSY_USERS = 'user\tcountry\nu1\t"fr"\nu2\t \nu9\tde\n'


@pytest.fixture
def messy(tmp_path: Path) -> CsvSpec:
    return CsvSpec(
        interactions=write(tmp_path / "interactions.csv", MESSY_INTERACTIONS),
        user_col="user",
        item_col="movie",
        rating_col="stars",
        time_col="when",
        items=write(tmp_path / "items.csv", MESSY_ITEMS, "latin-1"),
        title_col="title",
        categories_col="genres",
        author_col="director",
        item_time_col="year",
        users=write(tmp_path / "users.tsv", MESSY_USERS),
        region_col="country",
    )


def test_csv_importer_cleans_messy_files_and_counts_every_drop(messy: CsvSpec):
    data = load_csv(messy)
    assert data.report.rows_read == {"interactions.csv": 14, "items.csv": 5, "users.tsv": 3}
    assert data.report.dropped == {
        "interactions: malformed line (more fields than the header)": 1,
        "interactions: missing user or item id": 3,
        "interactions: missing rating": 1,
        "interactions: rating not a number": 1,
        "interactions: missing time": 1,
        "interactions: unparseable time": 1,
        "interactions: duplicate (user, item), kept latest": 2,
        "items: missing item id": 1,
        "items: duplicate item_id, kept last": 1,
    }
    notes = data.report.notes
    assert "items.csv: not valid UTF-8, read as Latin-1" in notes
    assert "items: 1 item id seen only in interactions (kept with empty metadata)" in notes
    assert "users: 1 user id seen only in interactions (kept with no region)" in notes
    assert "items: 1 unparseable item times left unknown" in notes
    assert any(note.startswith("like threshold 3.4: the upper 40%") for note in notes)

    interactions = data.interactions.set_index(["user_id", "item_id"])
    assert sorted(interactions.index) == [("u1", "m1"), ("u1", "m2"), ("u2", "m1"), ("u4", "m9")]
    assert interactions.loc[("u2", "m1"), "rating"] == 3  # the latest rating wins
    assert interactions.loc[("u2", "m1"), "timestamp"] == MARCH_4_2021 + 86_400
    assert interactions.loc[("u1", "m1"), "timestamp"] == MARCH_4_2021
    assert interactions.loc[("u4", "m9"), "timestamp"] == MARCH_4_2021  # month first
    assert data.like_threshold == pytest.approx(3.4)
    assert data.capabilities == dict.fromkeys(["rating", "time", "authors", "categories", "regions"], True)

    items = data.items.set_index("item_id")
    assert sorted(items.index) == ["m1", "m2", "m7", "m9"]
    assert items.loc["m1", "title"] == 'Café "Noir"'
    assert items.loc["m1", "categories"] == ["Drama", "Crime"]
    assert items.loc["m1", "item_time"] == 1999
    assert (items.loc["m2", "title"], items.loc["m2", "author"]) == ("B2", "Bob")
    assert items.loc["m2", "item_time"] == pd.Timestamp("2001-06-01", tz="UTC").timestamp()
    assert np.isnan(items.loc["m7", "item_time"])
    assert (items.loc["m9", "title"], items.loc["m9", "categories"], items.loc["m9", "author"]) == (
        "",
        [],
        None,
    )
    assert data.users.set_index("user_id")["region"].to_dict() == {
        "u1": "fr",
        "u2": None,
        "u9": "de",
        "u4": None,
    }
    check_canonical(data)
    assert data.source["parameters"]["read_as"]["users.tsv"] == {"encoding": "utf-8-sig", "delimiter": "\t"}
    assert set(data.source["files"]) == {"interactions.csv", "items.csv", "users.tsv"}


def test_csv_importer_without_optional_columns_switches_capabilities_off(tmp_path: Path):
    path = write(tmp_path / "clicks.csv", "user,item\n1,10\n1,10\n2,10\n2,11\n")
    data = load_csv(CsvSpec(interactions=path, user_col="user", item_col="item"))
    assert len(data.interactions) == 3
    assert data.report.dropped == {"interactions: duplicate (user, item), kept last": 1}
    assert data.capabilities == dict.fromkeys(["rating", "time", "authors", "categories", "regions"], False)
    assert data.like_threshold is None
    assert data.interactions["rating"].isna().all()
    assert "timestamp" not in data.interactions.columns
    notes = " | ".join(data.report.notes)
    for flag in ("--rating-col", "--time-col", "--items", "--users"):
        assert flag in notes
    assert (len(data.items), len(data.users)) == (2, 2)


def test_csv_importer_reads_a_publisher_column_and_leaves_none_without_one(tmp_path: Path):
    clicks = write(tmp_path / "clicks.csv", "user,item\n1,10\n2,11\n2,12\n")
    items = write(tmp_path / "items.csv", "id,press\n10, Tor Books \n11,\n12,n/a\n")
    spec = CsvSpec(interactions=clicks, user_col="user", item_col="item", items=items, item_id_col="id")
    with_publisher = load_csv(dataclasses.replace(spec, publisher_col="press")).items.set_index("item_id")
    assert with_publisher["publisher"].to_dict() == {"10": "Tor Books", "11": None, "12": None}
    assert load_csv(spec).items["publisher"].isna().all()
    with pytest.raises(CsvSpecError, match=r"^--publisher-col: needs --items"):
        load_csv(CsvSpec(interactions=clicks, user_col="user", item_col="item", publisher_col="press"))


def test_csv_importer_like_threshold_is_the_upper_40_percent_unless_given(tmp_path: Path):
    path = write(tmp_path / "ratings.csv", "u;i;r\n1;1;1\n1;2;10\n2;1;7\n2;2;6\n")
    data = load_csv(CsvSpec(interactions=path, user_col="u", item_col="i", rating_col="r"))
    assert data.like_threshold == pytest.approx(6.4)
    given = load_csv(CsvSpec(interactions=path, user_col="u", item_col="i", rating_col="r", like_threshold=8))
    assert given.like_threshold == 8


def test_csv_importer_wrong_column_names_the_flag_and_lists_the_columns(tmp_path: Path):
    path = write(tmp_path / "interactions.csv", "user,movie,stars\n1,2,3\n")
    with pytest.raises(CsvSpecError) as raised:
        load_csv(CsvSpec(interactions=path, user_col="uid", item_col="movie"))
    assert (
        str(raised.value)
        == "--user-col: column 'uid' not in interactions.csv; columns found: user, movie, stars"
    )
    assert raised.value.flag == "--user-col"
    assert isinstance(raised.value, ValueError)
    with pytest.raises(CsvSpecError, match=r"^--rating-col: column 'rating' not in interactions.csv"):
        load_csv(CsvSpec(interactions=path, user_col="user", item_col="movie", rating_col="rating"))
    items = write(tmp_path / "items.csv", "id,name\n2,x\n")
    with pytest.raises(
        CsvSpecError, match=r"^--item-id-col: column 'movie' not in items.csv \(--item-id-col defaults"
    ):
        load_csv(CsvSpec(interactions=path, user_col="user", item_col="movie", items=items))
    with pytest.raises(
        CsvSpecError, match=r"^--title-col: column 'title' not in items.csv; columns found: id, name"
    ):
        load_csv(
            CsvSpec(
                interactions=path,
                user_col="user",
                item_col="movie",
                items=items,
                item_id_col="id",
                title_col="title",
            )
        )


def test_csv_importer_missing_files_name_the_flag(tmp_path: Path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(CsvSpecError, match=r"^--interactions: no such file: .*nope\.csv"):
        load_csv(CsvSpec(interactions=missing, user_col="user", item_col="item"))
    path = write(tmp_path / "interactions.csv", "user,item\n1,2\n")
    with pytest.raises(CsvSpecError, match=r"^--users: no such file"):
        load_csv(CsvSpec(interactions=path, user_col="user", item_col="item", users=missing))
    with pytest.raises(CsvSpecError, match=r"^--region-col: needs --users"):
        load_csv(CsvSpec(interactions=path, user_col="user", item_col="item", region_col="country"))


def test_every_spec_field_has_its_flag():
    assert list(FLAGS) == [field.name for field in dataclasses.fields(CsvSpec)]
    assert all(flag == "--" + name.replace("_", "-") for name, flag in FLAGS.items())


def test_csv_importer_survives_broken_quotes_and_garbage_lines(tmp_path: Path):
    rng = np.random.default_rng(7)
    lines = ["user,item,rating", "1,2,3", '1,"3,4', "2,3,5"]
    lines += [rng.bytes(30).decode("latin-1").replace("\n", " ") for _ in range(20)]
    path = write(tmp_path / "broken.csv", "\n".join(lines) + "\n", "latin-1")
    data = load_csv(CsvSpec(interactions=path, user_col="user", item_col="item", rating_col="rating"))
    assert {("1", "2"), ("2", "3")} <= set(
        zip(data.interactions["user_id"], data.interactions["item_id"], strict=True)
    )
    assert sum(data.report.dropped.values()) + len(data.interactions) <= sum(data.report.rows_read.values())
    empty = write(tmp_path / "empty.csv", "user,item,rating\n,,\n")
    with pytest.raises(CsvSpecError, match=r"^--interactions: no usable interactions"):
        load_csv(CsvSpec(interactions=empty, user_col="user", item_col="item"))


def test_time_values_are_unix_seconds_milliseconds_or_dates():
    numbers = ["1614816000", "1614816000500", "1614816000.9"]
    dates = ["2021-03-04", ' "2021-03-04T01:00:00+01:00" ', "03/04/2021", "4 March 2021"]
    values = pd.Series([*numbers, *dates, "NULL", "", "garbage"])
    seconds, missing, milliseconds = parse_times(values)
    assert seconds[:7].tolist() == [MARCH_4_2021, MARCH_4_2021 + 0.5, MARCH_4_2021 + 0.9] + [MARCH_4_2021] * 4
    assert missing.tolist() == [False] * 7 + [True, True, False]
    assert np.isnan(seconds[7:]).all()
    assert milliseconds == 1


def test_clean_text_strips_stray_quotes_but_keeps_quoted_words():
    values = pd.Series(['  usa"', '"Quoted title"', 'Café "Noir"', '"Weird" Al', "", "n/a"])
    assert clean_text(values).tolist()[:4] == ["usa", "Quoted title", 'Café "Noir"', '"Weird" Al']
    assert clean_text(values)[4:].isna().all()


# --- synthetic -------------------------------------------------------------------------------------------

SMALL = SyntheticSpec(users=2_000, items=5_000, interactions=50_000, seed=3)


@pytest.fixture(scope="module")
def synthetic() -> RawData:
    return generate_synthetic(SMALL)


def test_synthetic_is_deterministic_per_seed(synthetic: RawData):
    again = generate_synthetic(SMALL)
    pd.testing.assert_frame_equal(again.interactions, synthetic.interactions)
    pd.testing.assert_frame_equal(again.items, synthetic.items)
    pd.testing.assert_frame_equal(again.users, synthetic.users)
    other = generate_synthetic(dataclasses.replace(SMALL, seed=4))
    assert not other.interactions.equals(synthetic.interactions)


def test_synthetic_shape(synthetic: RawData):
    interactions = synthetic.interactions
    assert len(interactions) == 50_000  # duplicates removed and replaced by new draws
    assert not interactions.duplicated(["user_id", "item_id"]).any()
    assert synthetic.report.dropped["interactions: duplicate (user, item) draws, replaced by new draws"] > 0
    assert interactions["user_id"].dtype == interactions["item_id"].dtype == np.int64
    assert (len(synthetic.items), len(synthetic.users)) == (5_000, 2_000)
    assert synthetic.capabilities == dict.fromkeys(
        ["rating", "time", "authors", "categories", "regions"], True
    )
    check_canonical(synthetic)
    assert synthetic.items["title"].iloc[17] == "item 17"
    assert synthetic.items["categories"].map(len).between(1, 3).all()
    assert synthetic.items["categories"].map(lambda names: len(set(names)) == len(names)).all()
    timestamps = interactions["timestamp"]
    assert timestamps.is_monotonic_increasing
    assert timestamps.iloc[-1] - timestamps.iloc[0] > 360 * 86_400


def test_synthetic_distributions_are_heavy_tailed(synthetic: RawData):
    interactions = synthetic.interactions
    per_item = interactions["item_id"].value_counts()
    assert per_item.iloc[:50].sum() / len(interactions) > 0.2  # top 1% of items
    per_user = interactions["user_id"].value_counts()
    assert per_user.max() > 8 * per_user.median()
    books = synthetic.items["author"].value_counts()
    assert books.max() > 8 * books.median()
    popularity = interactions["item_id"].map(per_item)
    assert np.corrcoef(np.log(popularity), interactions["rating"])[0, 1] > 0.2
    assert set(interactions["rating"].unique()) == {1, 2, 3, 4, 5}
    # Each region has its own favourites: the biggest region's top 20 is not the global top 20.
    region = interactions["user_id"].map(synthetic.users.set_index("user_id")["region"])
    biggest = region.value_counts().index[0]
    local_top = interactions.loc[region == biggest, "item_id"].value_counts().index[:20]
    assert len(set(local_top) & set(per_item.index[:20])) < 18


def test_synthetic_without_time_and_spec_validation():
    data = generate_synthetic(SyntheticSpec(users=50, items=40, interactions=300, with_time=False, authors=3))
    assert not data.has_time
    assert "timestamp" not in data.interactions.columns
    assert data.items["author"].nunique() <= 3
    with pytest.raises(ValueError, match=r"^items: must be at least 1"):
        SyntheticSpec(users=1, items=0, interactions=1)
    with pytest.raises(ValueError, match=r"^interactions: at most users × items"):
        SyntheticSpec(users=2, items=2, interactions=5)
