"""Offline data layer: every data set loaded into one canonical shape, `RawData`.

Loaders (pandas and numpy only, never TensorFlow):

- `load_movielens_100k(data_dir)`, `load_book_crossing(data_dir)` (and the separate cold-start
  set `load_book_crossing_new_books(data_dir)`): the real data sets under `default_data_dir()`;
- `load_csv(CsvSpec(...))`: any interactions CSV, with optional items and users files;
- `generate_synthetic(SyntheticSpec(...))`: seeded synthetic data at any scale (int64 ids).

`RawData.report` says what was read, dropped (with a reason per count) and assumed;
`RawData.capabilities` says which channels the data can feed (rating, time, authors,
categories, regions).
"""

from training.data.book_crossing import load_book_crossing, load_book_crossing_new_books
from training.data.csv_importer import CsvSpec, CsvSpecError, load_csv
from training.data.movielens import load_movielens_100k
from training.data.paths import default_data_dir, sha256_of
from training.data.raw import LoadReport, RawData
from training.data.synthetic import SyntheticSpec, generate_synthetic

__all__ = [
    "CsvSpec",
    "CsvSpecError",
    "LoadReport",
    "RawData",
    "SyntheticSpec",
    "default_data_dir",
    "generate_synthetic",
    "load_book_crossing",
    "load_book_crossing_new_books",
    "load_csv",
    "load_movielens_100k",
    "sha256_of",
]
