"""Pieces every service's wiring (`app.py`) shares."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from recsys.catalogue import CatalogueWatcher, NewItems
from recsys.feature_store import FeatureStore, InProcessFeatureStore, open_feature_store
from recsys.probe import probe
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from services.common.metrics import ServiceMetrics
from services.common.server import Readiness
from services.common.versions import Loaded, LocalVersionCopies, ModelVersions

log = logging.getLogger("recsys.config")

ConfigT = TypeVar("ConfigT")


def feature_store_for(
    redis_url: str | None,
    prefix: str,
    given: FeatureStore | None = None,
    *,
    read_budget: float | None = None,
) -> FeatureStore:
    """The feature store a service uses: the one given (tests, `recsys up` sharing one store
    between services), Redis when a URL is set, else the embedded in-process store.
    `read_budget` (seconds): the service's budget for a read, which the Redis store applies
    as the read's one timeout."""
    if given is not None:
        return given
    if redis_url:
        options = {} if read_budget is None else {"read_timeout": read_budget}
        return open_feature_store(redis_url, prefix=prefix, **options)
    return InProcessFeatureStore()


def load_serving_model(store: ModelStore, version: str) -> ServingModel:
    """Load a version and build its lookups and feature tables now, in the loading thread,
    rather than on the first request; refuse it (ModelProbeError) when its models answer a
    probe batch with non-finite or out-of-range outputs."""
    path = store.version_path(version)
    model = ServingModel.load(path, version=version)
    model.warm()
    probe(model, path)
    return model


async def version_loaded(
    features: FeatureStore, readiness: Readiness | None, loaded: Loaded[ServingModel]
) -> None:
    """A version was swapped in: the embedded feature store learns its users' snapshots (a
    Redis store got them from push-features), and the service can answer."""
    if isinstance(features, InProcessFeatureStore):
        features.add_version(loaded.version, loaded.model.core)
    if readiness is not None:
        await readiness.set_serving(True)


def local_copies_for(directory: Path | None) -> LocalVersionCopies | None:
    """Where a service copies its model versions before loading them (settings'
    `local_model_dir`), or None to load straight from the store."""
    return None if directory is None else LocalVersionCopies(directory)


class ConfigMetrics:
    def __init__(self, service: str) -> None:
        metrics = ServiceMetrics(service)
        self.reloads = metrics.counter(
            "config_reloads_total",
            "Changes of the scenes, experiments or blocklist files, by outcome "
            "(applied; rejected: invalid, the previous configuration keeps serving).",
            ("outcome",),
        )
        self.valid = metrics.gauge(
            "config_files_valid",
            "0 while the configuration files on disk are rejected (the previous ones serve).",
            multiprocess_mode="livemin",
        )


@functools.cache
def config_metrics(service: str) -> ConfigMetrics:
    return ConfigMetrics(service)


class ConfigReloader(Generic[ConfigT]):
    """Configuration files (scenes, experiments, blocklist: ConfigMaps on Kubernetes) that
    change while the service runs. `poll()` reads them; when their content differs from the
    last seen, `parse` builds a new configuration from them and `apply` swaps it in. A file
    that does not parse keeps the previous configuration serving, is logged and counted
    once per distinct content, and is tried again when it changes. Content is compared, not
    mtimes: the kubelet replaces a ConfigMap volume's files through a symlink swap, and an
    editor may keep the mtime."""

    def __init__(
        self,
        paths: Sequence[Path | None],
        parse: Callable[[], ConfigT],
        apply: Callable[[ConfigT], None],
        metrics: ConfigMetrics,
    ) -> None:
        self.paths = tuple(path for path in paths if path is not None)
        self._parse = parse
        self._apply = apply
        self._metrics = metrics
        self._seen = self._read()  # the files the service started with (parsed at start)
        self._metrics.valid.set(1)

    def _read(self) -> tuple[bytes | None, ...]:
        contents: list[bytes | None] = []
        for path in self.paths:
            try:
                contents.append(path.read_bytes())
            except OSError:  # missing for a moment (being replaced) or unreadable: a change
                contents.append(None)
        return tuple(contents)

    async def poll(self) -> bool:
        """True when changed files were applied."""
        if not self.paths:
            return False
        contents = await asyncio.to_thread(self._read)
        if contents == self._seen:
            return False
        self._seen = contents
        try:
            config = await asyncio.to_thread(self._parse)
        except (OSError, ValueError) as error:
            self._metrics.reloads.labels("rejected").inc()
            self._metrics.valid.set(0)
            log.error(
                "configuration files rejected, the previous configuration keeps serving: %s",
                error,
                extra={"files": [str(path) for path in self.paths], "error": str(error)},
            )
            return False
        # On the event loop, with no await in between: a call sees the old configuration or
        # the new one, never a mix.
        self._apply(config)
        self._metrics.reloads.labels("applied").inc()
        self._metrics.valid.set(1)
        log.info("configuration files reloaded", extra={"files": [str(path) for path in self.paths]})
        return True


class CatalogueMetrics:
    def __init__(self, service: str) -> None:
        metrics = ServiceMetrics(service)
        self.revision = metrics.gauge(
            "catalogue_revision",
            "The live catalogue's revision this process serves (grows with every change).",
        )
        self.new_items = metrics.gauge(
            "catalogue_new_items", "Items upserted while serving that the current model version serves."
        )
        self.withdrawn = metrics.gauge(
            "catalogue_withdrawn_items",
            "Items withdrawn (upserted ones or the version's own) on the current version.",
        )
        self.poll_failures = metrics.counter(
            "catalogue_poll_failures_total",
            "Polls of the live catalogue that failed (the last view keeps serving).",
        )


@functools.cache
def catalogue_metrics(service: str) -> CatalogueMetrics:
    return CatalogueMetrics(service)


def catalogue_watcher_for(
    service: str,
    features: FeatureStore,
    versions: ModelVersions[ServingModel],
    poll_seconds: float,
    prepare: Callable[[ServingModel, NewItems], None] | None = None,
    impressions_horizon: Callable[[], float] | None = None,
) -> CatalogueWatcher:
    """The service's watcher of the live catalogue, laying it out for every servable version,
    with its metrics (`recsys_<service>_catalogue_…`)."""
    metrics = catalogue_metrics(service)

    def servable() -> list[tuple[str, ServingModel]]:
        return [(version, versions.get(version).model) for version in versions.available()]

    def observe(watcher: CatalogueWatcher, succeeded: bool) -> None:
        if not succeeded:
            metrics.poll_failures.inc()
            return
        metrics.revision.set(watcher.revision)
        current = versions.current
        view = None if current is None else watcher.view(current.version)
        metrics.new_items.set(0 if view is None else len(view))
        metrics.withdrawn.set(0 if view is None else int(view.withdrawn.shape[0]))

    return CatalogueWatcher(
        features,
        servable,
        poll_seconds,
        prepare=prepare,
        on_poll=observe,
        impressions_horizon=impressions_horizon,
    )
