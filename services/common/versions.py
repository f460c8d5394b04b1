"""Model versions in a serving process: watch the store's CURRENT, load a new version in the
background, swap atomically, keep the previous one for a grace period.

- Until the first version is loaded the service is not ready (health NOT_SERVING).
- A version whose checksums do not match (or that fails to load) is refused; the loaded one
  keeps serving and the refusal is logged and counted.
- With a Redis feature store, a version is switched to only once its features are pushed
  (its "ready" marker is set), so `build` → `push-features` → switch, in that order.
- Calls may name a version: the current one, or the previous one during its grace period;
  anything else is `WrongModelVersion` (FAILED_PRECONDITION at the edge).
- Last good version: a process that starts while CURRENT names a version it cannot load (bad
  checksums, a model failing its probe, a file missing) or cannot serve yet (features not
  pushed) loads the newest other version that loads and verifies, serves it and says so
  (`version_fallback` gauge 1, an ERROR line); a process already serving keeps its version,
  flagged the same way. CURRENT is retried every poll while its failure may be passing and
  every `retry_refused_seconds` once refused, and is switched to as soon as it loads. A crash or
  rolling restart during a bad release thus keeps the tier up instead of leaving every new pod
  NOT_SERVING. A fallback version whose features are not in the feature store serves with
  `snapshot_ready` False (the version's own data, flagged), as after a lost snapshot.
- A version that can no longer serve (replaced, its grace over) has its `version` label
  series removed (and `on_retire` called), so a process's series do not grow with releases.
- With a local copy directory (`LocalVersionCopies`), a version is copied there, its
  checksums are verified on the copy, and it is loaded from the copy; copies of versions no
  longer servable are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from recsys.errors import NotReady, WrongModelVersion
from recsys.feature_store import FeatureStoreUnavailable
from recsys.store import ModelStore, StoreIntegrityError
from recsys.store.layout import MANIFEST_FILE, Manifest, check_files, remove_version_directory
from services.common.metrics import ServiceMetrics

log = logging.getLogger("recsys.versions")

MAX_LOAD_ATTEMPTS = 3

ModelT = TypeVar("ModelT")
Loader = Callable[[ModelStore, str], ModelT]
ReadyCheck = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class Loaded(Generic[ModelT]):
    version: str
    model: ModelT
    loaded_at: float


class VersionMetrics:
    def __init__(self, service: str) -> None:
        metrics = ServiceMetrics(service)
        self.loaded = metrics.gauge(
            "model_version_info", "1 for each model version this process can serve.", ("version", "role")
        )
        self.loads = metrics.counter("model_loads_total", "Model version loads by outcome.", ("outcome",))
        self.created = metrics.gauge(
            "model_created_timestamp_seconds",
            "When the current model version was built (unix seconds): alert when it gets too old.",
            multiprocess_mode="max",
        )
        self.snapshot_ready = metrics.gauge(
            "feature_snapshot_ready",
            "1 while the current model version's features are in the feature store (its ready "
            "marker is set), 0 once they are found missing (e.g. Redis came back empty).",
            multiprocess_mode="livemin",
        )
        self.repushes = metrics.counter(
            "feature_snapshot_repushes_total",
            "Re-pushes of a lost feature snapshot by this process, by outcome "
            "(pushed, locked: another process pushes, failed).",
            ("outcome",),
        )
        self.fallback = metrics.gauge(
            "version_fallback",
            "1 while this process serves another version than CURRENT because CURRENT cannot be loaded.",
            multiprocess_mode="max",
        )
        self.load_seconds = metrics.histogram(
            "model_load_seconds",
            "Time to load and verify a model version.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60),
        )


class LocalVersionCopies:
    """Model versions copied to this process's own disk (a pod's emptyDir) and loaded from
    there. Arrays are memory-mapped: mapped straight from a shared network volume, every page
    fault on a call would go to the file server, and pruning a version there (another node's
    build) can SIGBUS this process. A local copy is read once, verified, and is this process's
    to delete. Workers of one pod share the directory: each copies into its own staging
    directory and renames it into place, so a reader never sees half a copy."""

    STAGING_PREFIX = ".copy-"

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(self.directory)

    def copy(self, shared: ModelStore, version: str) -> None:
        """Copy `version` from `shared` unless a verified copy is already here; raise
        StoreIntegrityError when the copy does not match its manifest."""
        target = self.directory / version
        if target.is_dir():
            try:  # left by an earlier container of this pod, or by another worker
                check_files(target, self._manifest(target, version))
                return
            except (StoreIntegrityError, OSError, ValueError):
                remove_version_directory(target)
        staging = self.directory / f"{self.STAGING_PREFIX}{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(shared.version_path(version), staging)
            # The copy is what will be mapped, so the copy is what must match the checksums.
            check_files(staging, self._manifest(staging, version))
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():  # not another worker's copy that won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _manifest(directory: Path, version: str) -> Manifest:
        manifest = Manifest.from_json((directory / MANIFEST_FILE).read_bytes())
        if manifest.version != version:
            raise StoreIntegrityError(f"{directory}: its manifest describes {manifest.version!r}")
        return manifest

    def retire(self, keep: Collection[str]) -> list[str]:
        """Delete the copies of every version not in `keep`; return their names. A process
        still mapping one keeps its pages (an unlinked file lives on while mapped)."""
        removed = []
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".") or entry.name in keep or not entry.is_dir():
                continue
            remove_version_directory(entry)
            removed.append(entry.name)
        return removed


@functools.cache
def version_metrics(service: str) -> VersionMetrics:
    """One set per service and process (Prometheus refuses a metric registered twice)."""
    return VersionMetrics(service)


class ModelVersions(Generic[ModelT]):
    """The versions a process serves. `current` is swapped by reference: readers take it once
    per call and keep using that object, so a swap never changes a call half-way."""

    def __init__(
        self,
        store: ModelStore,
        loader: Loader[ModelT],
        metrics: VersionMetrics,
        *,
        poll_seconds: float = 5.0,
        grace_seconds: float = 60.0,
        verify: bool = True,
        ready_check: ReadyCheck | None = None,
        on_change: Callable[[Loaded[ModelT]], Awaitable[None]] | None = None,
        on_servable: Callable[[list[str]], Awaitable[None]] | None = None,
        snapshot_check: ReadyCheck | None = None,
        on_snapshot_lost: Callable[[Loaded[ModelT]], Awaitable[None]] | None = None,
        on_retire: Callable[[str], None] | None = None,
        retry_refused_seconds: float = 60.0,
        local_copies: LocalVersionCopies | None = None,
        on_poll: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._store = store
        self._local = local_copies
        self._on_poll = on_poll  # more files to watch at each poll (scenes, experiments, ...)
        self._loader = loader
        self._metrics = metrics
        self._poll_seconds = poll_seconds
        self._grace_seconds = grace_seconds
        self._verify = verify
        self._ready_check = ready_check
        self._on_change = on_change
        self._on_servable = on_servable
        self._snapshot_check = snapshot_check
        self._on_snapshot_lost = on_snapshot_lost
        self._on_retire = on_retire
        self._retry_refused_seconds = retry_refused_seconds
        # Whether the current version's features are in the feature store, re-checked at
        # every poll: a Redis that restarts empty loses them without anyone being told.
        self.snapshot_ready = True
        self.current: Loaded[ModelT] | None = None
        self.previous: Loaded[ModelT] | None = None
        self._previous_until = 0.0
        self._refused: dict[str, float] = {}  # version → when it was refused (monotonic)
        # CURRENT's name while this process serves another version because CURRENT cannot load.
        self.fallback_from: str | None = None
        self._failures: dict[str, int] = {}  # version → failed load attempts
        self._marker: tuple[str | None, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- reading -------------------------------------------------------------------------
    def get(self, version: str = "") -> Loaded[ModelT]:
        """The loaded version a call asked for ("" = current)."""
        current = self.current
        if current is None:
            raise NotReady("no model version is loaded yet")
        if not version or version == current.version:
            return current
        previous = self.previous
        if previous is not None and version == previous.version and time.monotonic() < self._previous_until:
            return previous
        raise WrongModelVersion(version, self.available())

    def available(self) -> list[str]:
        names = [] if self.current is None else [self.current.version]
        if self.previous is not None and time.monotonic() < self._previous_until:
            names.append(self.previous.version)
        return names

    # -- watching --------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin watching; the first load happens in the background (call `refresh()` to
        wait for it)."""
        self._task = asyncio.create_task(self._watch(), name="model-version-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bad store state must not kill the watcher
                log.exception("checking the model store failed")
            try:
                await self.check_snapshot()
            except Exception:
                log.exception("checking the current version's features failed")
            if self._on_poll is not None:
                try:
                    await self._on_poll()
                except Exception:
                    log.exception("the poll's extra check failed")
            if self._expire_previous():
                await asyncio.to_thread(self._retire_copies)
                if self._on_servable is not None:
                    await self._on_servable(self.available())
            await asyncio.sleep(self._poll_seconds)

    async def check_snapshot(self) -> bool:
        """Re-check that the current version's features are still in the feature store;
        False (flagged, counted and handed to `on_snapshot_lost`) when they are gone. A
        feature store that does not answer leaves the last finding unchanged: that is an
        outage, reported as such by the calls themselves."""
        current = self.current
        if self._snapshot_check is None or current is None:
            return True
        try:
            ready = await self._snapshot_check(current.version)
        except FeatureStoreUnavailable:
            return self.snapshot_ready
        if ready != self.snapshot_ready:
            if ready:
                log.warning("the features of version %s are back", current.version)
            else:
                log.error(
                    "the features of version %s are missing from the feature store (its ready "
                    "marker is gone: Redis restarted empty or was flushed)",
                    current.version,
                    extra={"version": current.version},
                )
        self.snapshot_ready = ready
        self._metrics.snapshot_ready.set(1 if ready else 0)
        if not ready and self._on_snapshot_lost is not None:
            await self._on_snapshot_lost(current)
        return ready

    def _expire_previous(self) -> bool:
        if self.previous is not None and time.monotonic() >= self._previous_until:
            retired, self.previous = self.previous.version, None
            self._retire(retired)
            return True
        return False

    def _retire(self, version: str) -> None:
        if self.current is not None and self.current.version == version:
            return
        for role in ("current", "previous"):
            with contextlib.suppress(KeyError):
                self._metrics.loaded.remove(version, role)
        if self._on_retire is not None:
            try:
                self._on_retire(version)
            except Exception as error:  # dropping metrics must never break the watcher
                log.warning("retiring a version's metrics failed", extra={"error": repr(error)})

    def _set_fallback(self, current_name: str | None) -> None:
        self.fallback_from = current_name
        self._metrics.fallback.set(0 if current_name is None else 1)

    async def refresh(self) -> bool:
        """Load and switch to the store's CURRENT if it changed; True when a switch happened."""
        async with self._lock:
            marker = await asyncio.to_thread(self._store.current_marker)
            name = marker[0]
            if marker == self._marker or name is None:
                return False
            if self.current is not None and name == self.current.version:
                self._marker = marker
                self._set_fallback(None)
                return False
            refused_at = self._refused.get(name)
            if refused_at is not None:
                if time.monotonic() - refused_at < self._retry_refused_seconds:
                    return await self._fall_back_if_idle(name)
                # Refused a while ago: the operator may have repaired it in place. One more try.
                del self._refused[name]
                self._failures.pop(name, None)
            if self._ready_check is not None and not await self._ready_check(name):
                # Not servable yet (features not pushed; for the gateway, recall or rank not
                # serving it yet): look again at the next poll, without remembering the
                # marker, so the switch happens as soon as it is.
                log.info("version waits until it can be served", extra={"version": name})
                if self.current is None:  # a process starting between build and push-features
                    return await self._fall_back_if_idle(name, "cannot be served yet")
                return False
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._load, name)
            except Exception as error:
                # A version that fails its checksums, or fails to load MAX_LOAD_ATTEMPTS times,
                # is refused for good; any other failure may be passing (a file system hiccup,
                # memory pressure) and is retried at the next polls.
                attempts = self._failures.get(name, 0) + 1
                self._failures[name] = attempts
                final = isinstance(error, StoreIntegrityError) or attempts >= MAX_LOAD_ATTEMPTS
                if final:
                    self._refused[name] = time.monotonic()
                self._metrics.loads.labels("refused" if final else "failed").inc()
                serving = self.current.version if self.current else None
                log.error(
                    "model version %s %s (attempt %d): %s: %s; serving %s",
                    name,
                    "refused" if final else "failed to load, retrying at the next poll",
                    attempts,
                    type(error).__name__,
                    error,
                    serving or "nothing yet",
                    extra={"version": name, "serving": serving, "error": str(error)},
                )
                return await self._fall_back_if_idle(name)
            self._metrics.load_seconds.observe(time.perf_counter() - started)
            self._metrics.loads.labels("loaded").inc()
            self._swap(Loaded(name, model, time.time()))
            self._marker = marker
            self._set_fallback(None)
            await asyncio.to_thread(self._retire_copies)  # rmtree off the event loop
        if self._on_change is not None and self.current is not None:
            await self._on_change(self.current)
        if self._on_servable is not None:
            await self._on_servable(self.available())
        return True

    async def _fall_back_if_idle(self, current_name: str, why: str = "cannot be loaded") -> bool:
        """CURRENT (`current_name`) cannot be served (`why`). A process serving something keeps
        it; one serving nothing loads the newest other version that loads and verifies (first
        among those whose features are ready, then any). True when it switched. Runs under
        the lock."""
        if self.current is not None:
            if self.fallback_from != current_name:
                self._set_fallback(current_name)
                log.error(
                    "CURRENT names %s, which %s; still serving %s",
                    current_name,
                    why,
                    self.current.version,
                    extra={"version": current_name, "serving": self.current.version},
                )
            return False
        listed = await asyncio.to_thread(self._store.versions)
        candidates = [
            info.name
            for info in reversed(listed)
            if info.name != current_name and info.name not in self._refused
        ]
        ready: list[str] = []
        waiting: list[str] = []
        for candidate in candidates:
            if self._ready_check is None or await self._ready_check(candidate):
                ready.append(candidate)
            else:
                waiting.append(candidate)
        # A version whose features are not pushed can still answer, from its own data (as after
        # a lost snapshot): better than no answer at all.
        for candidate in [*ready, *waiting]:
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._load, candidate)
            except Exception as error:
                final = isinstance(error, StoreIntegrityError)
                if final:
                    self._refused[candidate] = time.monotonic()
                self._metrics.loads.labels("refused" if final else "failed").inc()
                log.error(
                    "fallback version %s cannot be loaded either: %s: %s",
                    candidate,
                    type(error).__name__,
                    error,
                    extra={"version": candidate, "error": str(error)},
                )
                continue
            self._metrics.load_seconds.observe(time.perf_counter() - started)
            self._metrics.loads.labels("fallback").inc()
            loaded = Loaded(candidate, model, time.time())
            self._swap(loaded)
            if candidate not in ready and self._snapshot_check is not None:
                # Its features are not in the feature store: answers say so from the first call
                # (the next poll's check_snapshot hands it to on_snapshot_lost, which pushes them).
                self.snapshot_ready = False
                self._metrics.snapshot_ready.set(0)
            self._set_fallback(current_name)
            await asyncio.to_thread(self._retire_copies)
            log.error(
                "CURRENT names %s, which %s; serving the last good version %s%s",
                current_name,
                why,
                candidate,
                "" if candidate in ready else " (its features are not pushed: answers use its own data)",
                extra={"version": current_name, "serving": candidate},
            )
            if self._on_change is not None:
                await self._on_change(loaded)
            if self._on_servable is not None:
                await self._on_servable(self.available())
            return True
        self._set_fallback(None)
        return False

    def _load(self, name: str) -> ModelT:
        if self._local is not None:
            self._local.copy(self._store, name)  # verified on the copy, always
            return self._loader(self._local.store, name)
        if self._verify:
            self._store.verify(name)
        return self._loader(self._store, name)

    def _retire_copies(self) -> None:
        if self._local is None:
            return
        try:
            removed = self._local.retire(set(self.available()))
        except OSError as error:  # disk clutter must never stop serving
            log.warning("could not delete retired model copies", extra={"error": repr(error)})
            return
        if removed:
            log.info("deleted local copies of retired versions", extra={"versions": removed})

    def _swap(self, loaded: Loaded[ModelT]) -> None:
        old = self.current
        dropped = self.previous
        if old is not None:
            self.previous = old
            self._previous_until = time.monotonic() + self._grace_seconds
            with contextlib.suppress(KeyError):
                self._metrics.loaded.remove(old.version, "current")
            self._metrics.loaded.labels(old.version, "previous").set(1)
        self.current = loaded  # one reference assignment: readers see old or new, never a mix
        if dropped is not None and dropped.version not in (loaded.version, old.version if old else None):
            self._retire(dropped.version)
        self.snapshot_ready = True  # switched to on its ready marker (or needs none)
        self._metrics.snapshot_ready.set(1)
        self._metrics.loaded.labels(loaded.version, "current").set(1)
        try:
            self._metrics.created.set(self._store.manifest(loaded.version).created_at.timestamp())
        except Exception as error:  # a metric must never undo a swap
            log.warning("could not read the version's creation time", extra={"error": repr(error)})
        previous = old.version if old else None
        log.info("serving model version", extra={"version": loaded.version, "previous": previous})
