"""The versioned model store: what `recsys build` writes and the services load.

A store is a directory (`PATH` or `file://PATH`) of immutable versions, each with a
`manifest.json` listing its artifacts and their checksums, and a `CURRENT` file naming the
version to serve. `VersionWriter` publishes a version atomically; `ModelStore` lists,
verifies, rolls back and prunes. numpy and the standard library only (no TensorFlow, no gRPC).
See `recsys.store.layout` for the format.
"""

from recsys.store.layout import (
    CURRENT_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ArtifactEntry,
    IncompleteVersion,
    Manifest,
    StoreError,
    StoreIntegrityError,
    VersionNotFound,
    new_version_name,
    parse_store_location,
    validate_version_name,
)
from recsys.store.reader import ModelStore, VersionInfo
from recsys.store.writer import VersionWriter, code_version

__all__ = [
    "CURRENT_FILE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "ArtifactEntry",
    "IncompleteVersion",
    "Manifest",
    "ModelStore",
    "StoreError",
    "StoreIntegrityError",
    "VersionInfo",
    "VersionNotFound",
    "VersionWriter",
    "code_version",
    "new_version_name",
    "parse_store_location",
    "validate_version_name",
]
