"""`RedisFeatureStore`: the feature store in Redis (redis.asyncio with hiredis).

Key schema (`P` is the prefix, "recsys" by default; `U` the external user id, with `%`, `{`
and `}` percent-encoded so that `{U}` is always a valid Redis Cluster hash tag):

| key | type | what |
| --- | --- | --- |
| `P:v:VERSION:ready` | string | JSON summary (users, bytes, pushed_at, format); set last by push-features |
| `P:v:VERSION:u:{U}:snap` | string | the user's packed snapshot in VERSION (`Snapshot.pack`) |
| `P:v:VERSION:push-lock` | string | held (SET NX EX) by the one process re-pushing lost features |
| `P:u:{U}:live` | list | packed live events (`LiveEvent.pack`), oldest first, LTRIM-capped |
| `P:u:{U}:seen:SLICE` | string | the exposure Bloom filter of time slice SLICE (`ExposureFilterConfig`) |
| `P:u:{U}:cache` | hash | cache channel: item id → packed `<ddI`: score, time added, uses |
| `P:u:{U}:applied:TOKEN` | string | "1": that `append_events` call was applied (its retries do nothing) |
| `P:evt:EVENT_ID` | string | the marking call's token, SET NX GET EX: the event was applied (idempotency) |
| `P:events` | stream | the durable event log (`RedisEventLog`): one entry per accepted event, capped ~N |
| `P:events:applied:{P:events}:TOKEN` | string | "1": that `log_append` call was applied (as above) |
| `P:{catalogue}:items` | hash | live catalogue: item id → `CatalogueItem.to_json` (metadata, time upserted) |
| `P:{catalogue}:ordinals` | hash | item id → its ordinal, assigned by the first upsert, never changed |
| `P:{catalogue}:next` | string | the next ordinal (INCR) |
| `P:{catalogue}:withdrawn` | hash | item id → unix time it was withdrawn (an upsert removes it) |
| `P:{catalogue}:rev` | string | the catalogue's revision, INCR on every change (what services poll) |
| `P:{catalogue}:engagers` | hash | new item id → JSON array of its first K engaged user ids (look-alike) |
| `P:{catalogue}:engagers-rev` | string | INCR whenever an engager is added (what recall polls) |
| `P:{catalogue}:impressions` | hash | upserted item id → times the gateway showed it (HINCRBY) |

- A snapshot is `16 + 16·n` bytes: header `<4sIiI` (b"RSS1", n, region token, 0), then
  times int64[n], items int32[n], ratings float32[n], little-endian. Users with no
  history and no region are not written (they read as empty, as unknown users do).
- Version keys never expire; `delete_version` removes them (SCAN + UNLINK) when the store
  prunes the version. The ready key is the last written and the first deleted.
- Live lists expire `live_ttl_seconds` after the user's last event. Exposure slices are
  written with `BITFIELD … SET u1` (so concurrent writers never lose bits; the command also
  grows the string to exactly m/8 bytes) and expire N + 1 slices after the slice began. The
  cache hash expires `cache_max_age_seconds` after its last put; `put_cache` and `take_cache`
  are Lua scripts, so concurrent takes never serve an item more than `cache_max_uses` times.
- The catalogue keys share the hash tag `{catalogue}` (one slot in a cluster), so that the
  upsert and withdraw scripts change them atomically and a poll reads them in one pipeline.
  They never expire: an item stays until a build absorbs it (a later concern). The
  impressions hash only counts ids the items hash holds (one script checks and increments),
  so it is bounded by the catalogue.
- The `applied` markers of `append_events` and `log_append` (one per call, a random token,
  set by the script that writes) expire `WRITE_MARKER_SECONDS` (60 s) after the call's
  deadline: long enough for any attempt of the call still under way to find its marker.
- Every key of one user carries the hash tag `{U}`, so in Redis Cluster they share a slot and
  `user_state` (GET + LRANGE + MGET + HGETALL) is one pipeline to one node. No command spans
  users except the event-id SETs, which a cluster pipeline splits by slot.

Cluster mode (`redis+cluster://…` or `?cluster=1`) uses `redis.asyncio.cluster.RedisCluster`
and is tested against a real three-master cluster (tests/support/redis_cluster.py): the
contract suite, a stack, a planned failover under load and a killed master. Pipelines are
never transactions there; multi-key commands (MGET of a user's slices, UNLINK) go as raw
commands, which redis-py's cluster pipeline routes by slot. MOVED is followed by redis-py
within the call; a node failure makes the store re-read the slot map (`note_failure`).

Every call has one timeout, its budget: reads `read_timeout` (50 ms by default; the services
set their feature-store budget here), writes `write_timeout`, with no retries (the caller's
deadline is the retry budget), except the writes of events (ReportEvents), which take a
`deadline` and are retried until it after the errors a failover gives (`_write`); each of
them is idempotent, so a retry never applies an event twice. Failures raise
`FeatureStoreUnavailable`. A call whose budget runs out is answered at once but its command
is left to finish in the background rather than cut off (redis-py closes a connection whose
read is interrupted, and a slow Redis would become a reconnect storm); each pool is a
`BlockingConnectionPool` of `max_connections` (32), so a slow Redis holds at most that many
connections and further calls fail within their budget without opening any.
`connection_timeout` (1 s) is how late a reply may be before its connection is taken for
broken and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MaxConnectionsError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from recsys.feature_store.base import (
    CatalogueItem,
    CatalogueState,
    FeatureStoreUnavailable,
    LiveDataPolicy,
    LiveEvent,
    Snapshot,
    StoredItem,
    UserState,
    best_first,
    cache_entry_alive,
    newest_last,
)

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "recsys"
DEFAULT_READ_TIMEOUT = 0.05
DEFAULT_WRITE_TIMEOUT = 0.2
DEFAULT_MAX_CONNECTIONS = 32  # per pool (reads, writes) and process
DEFAULT_CONNECTION_TIMEOUT = 1.0

CACHE_ENTRY = struct.Struct("<ddI")  # score, time added, uses
_SCORE = struct.Struct("<d")
_UNLINK_BATCH = 500

Client = Redis | RedisCluster
T = TypeVar("T")

# Errors after which a cluster client's slot map may be stale: a node died or a failover is
# under way. MaxConnectionsError is a ConnectionError but says only that our pool is full.
_TOPOLOGY_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
    OSError,
    RuntimeError,
    AttributeError,
)
# What a failing Redis raises: redis-py's cluster errors about slots (SlotNotCoveredError, "no
# targets") derive from RedisClusterException, which is not a RedisError; and under uvloop a
# write to a connection the dead peer has just closed raises RuntimeError ("unable to perform
# operation on <TCPTransport closed=True>"), which redis-py passes on as it is, as it does
# AttributeError when a connection is disconnected by another task while a command is being
# written on it ("'NoneType' object has no attribute 'writelines'"); both seen while a
# cluster master was killed under load. Inside a command only redis-py's code runs, so
# these are the dependency failing, not a bug of ours to surface as INTERNAL.
_FAILURES = (RedisError, RedisClusterException, OSError, RuntimeError, AttributeError)
# What a write may be made again after (besides its budget running out), when it has a
# deadline: what a failover or a node failure gives, none of which says the command is wrong.
# MOVED/ASK (AskError) normally are followed by redis-py within the call; one that is not (the
# redirect target unknown yet) is worth another attempt once the slot map was re-read. A full
# pool (MaxConnectionsError) is worth one too: during a pause its connections are held by
# commands the old master has not answered yet. Every other ResponseError (WRONGTYPE, OOM, …)
# would fail again.
_TRANSIENT = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    AskError,
    ReadOnlyError,
    RedisClusterException,
    OSError,
    RuntimeError,
    AttributeError,
)
# Between attempts of a retried write: 20 ms, doubled up to 100 ms (time for the store's slot
# map refresh, `note_failure`, and for the cluster to finish its switch).
_RETRY_DELAY = 0.02
_RETRY_DELAY_MAX = 0.1
_MIN_ATTEMPT_SECONDS = 0.01  # no attempt is started with less of the deadline left
# How long a retried write's marker outlives its deadline: an abandoned attempt (never cut
# off, see `_call`) may still be applied after it, and must then find the marker.
WRITE_MARKER_SECONDS = 60

# At most one slot-map refresh per client this often while a node stays unreachable, so a dead
# master does not turn every call into CLUSTER SLOTS on the others.
CLUSTER_REFRESH_INTERVAL = 0.1

# KEYS[1]: cache hash. ARGV: limit, now, max_age, max_uses.
_TAKE_CACHE = """
local key = KEYS[1]
local limit, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_age, max_uses = tonumber(ARGV[3]), tonumber(ARGV[4])
local flat = redis.call('HGETALL', key)
local alive = {}
for i = 1, #flat, 2 do
  local score, added, uses = struct.unpack('<ddI4', flat[i + 1])
  if uses >= max_uses or now - added > max_age then
    redis.call('HDEL', key, flat[i])
  else
    alive[#alive + 1] = {flat[i], score, added, uses}
  end
end
table.sort(alive, function(a, b)
  if a[2] ~= b[2] then return a[2] > b[2] end
  return a[1] < b[1]
end)
local taken = {}
for i = 1, math.min(limit, #alive) do
  local entry = alive[i]
  local uses = entry[4] + 1
  if uses >= max_uses then
    redis.call('HDEL', key, entry[1])
  else
    redis.call('HSET', key, entry[1], struct.pack('<ddI4', entry[2], entry[3], uses))
  end
  taken[#taken + 1] = entry[1]
  taken[#taken + 1] = struct.pack('<d', entry[2])
end
return taken
"""

# KEYS[1]: a lock. ARGV[1]: its owner. Deletes it only if the owner still holds it.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1]: cache hash. ARGV: now, max_items, ttl, max_age, max_uses, then item, score pairs.
_PUT_CACHE = """
local key = KEYS[1]
local now, max_items, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_age, max_uses = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 6, #ARGV, 2 do
  local uses = 0
  local old = redis.call('HGET', key, ARGV[i])
  if old then
    local _, _, previous = struct.unpack('<ddI4', old)
    uses = previous
  end
  redis.call('HSET', key, ARGV[i], struct.pack('<ddI4', tonumber(ARGV[i + 1]), now, uses))
end
if redis.call('HLEN', key) > max_items then
  local flat = redis.call('HGETALL', key)
  local alive = {}
  for i = 1, #flat, 2 do
    local score, added, uses = struct.unpack('<ddI4', flat[i + 1])
    if uses >= max_uses or now - added > max_age then
      redis.call('HDEL', key, flat[i])
    else
      alive[#alive + 1] = {flat[i], score}
    end
  end
  table.sort(alive, function(a, b)
    if a[2] ~= b[2] then return a[2] > b[2] end
    return a[1] < b[1]
  end)
  for i = max_items + 1, #alive do
    redis.call('HDEL', key, alive[i][1])
  end
end
redis.call('EXPIRE', key, ttl)
return 1
"""


# KEYS: items, ordinals, next, withdrawn, rev; ARGV: now, then (id, json) pairs. Returns the
# flat (ordinal, 1 if new else 0) pairs. One script: two writers upserting the same new id at
# once must not give it two ordinals.
_UPSERT_ITEMS = """
local out = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local ordinal = redis.call('HGET', KEYS[2], id)
  local new = 0
  if not ordinal then
    ordinal = redis.call('INCR', KEYS[3]) - 1
    redis.call('HSET', KEYS[2], id, ordinal)
    new = 1
  end
  redis.call('HSET', KEYS[1], id, ARGV[i + 1])
  redis.call('HDEL', KEYS[4], id)
  out[#out + 1] = tonumber(ordinal)
  out[#out + 1] = new
end
if #ARGV > 1 then redis.call('INCR', KEYS[5]) end
return out
"""

# KEYS: withdrawn, rev; ARGV: now, then ids. Returns 1 per id not withdrawn before, else 0.
_WITHDRAW_ITEMS = """
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[1])
end
if #ARGV > 1 then redis.call('INCR', KEYS[2]) end
return out
"""

# KEYS: items, impressions; ARGV: id, count, id, count, … Only catalogue items are counted.
_ADD_ITEM_IMPRESSIONS = """
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""


# KEYS: engagers, engagers-rev; ARGV: limit, then (item id, user id) pairs. Returns how many
# engagers were added. One script: two gateways reporting at once must not both take the
# K-th place, nor add one user twice. The arrays hold at most `limit` ids (bounded per item).
_RECORD_ENGAGERS = """
local limit = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV, 2 do
  local item, user = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', KEYS[1], item)
  local users = {}
  if raw then users = cjson.decode(raw) end
  if #users < limit then
    local seen = false
    for _, known in ipairs(users) do
      if known == user then seen = true break end
    end
    if not seen then
      users[#users + 1] = user
      redis.call('HSET', KEYS[1], item, cjson.encode(users))
      added = added + 1
    end
  end
end
if added > 0 then redis.call('INCR', KEYS[2]) end
return added
"""


# KEYS: the user's live list, the call's marker. ARGV: marker ttl, max length, list ttl (0:
# none), then packed events. Applies the call once however often it is sent: an attempt that
# finds the marker (set by an earlier attempt that was applied, or a later one that overtook
# it) does nothing. One script, so the marker and the events are written together or not at
# all; both keys carry the user's hash tag (one slot).
_APPEND_EVENTS = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS: the event stream, the call's marker (hash tag: the stream's name, so one slot).
# ARGV: marker ttl, approximate max length, then per entry its field count and field, value
# pairs. Applied once per call, as _APPEND_EVENTS.
_LOG_APPEND = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
end
return 1
"""


class RedisKeys:
    """The key schema (see the module docstring) under one prefix."""

    def __init__(self, prefix: str) -> None:
        if not prefix or "{" in prefix or "}" in prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix: expected a non-empty string without braces or spaces, got {prefix!r}")
        self.prefix = prefix

    @staticmethod
    def user_tag(user_id: str) -> str:
        """The user id as a hash tag body: `%`, `{`, `}` percent-encoded (one-to-one)."""
        if "%" in user_id or "{" in user_id or "}" in user_id:
            user_id = user_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return user_id

    def _version(self, version: str) -> str:
        if not version or "{" in version or "}" in version:
            raise ValueError(f"version: expected a non-empty name without braces, got {version!r}")
        return f"{self.prefix}:v:{version}"

    def ready(self, version: str) -> str:
        return f"{self._version(version)}:ready"

    def push_lock(self, version: str) -> str:
        return f"{self._version(version)}:push-lock"

    def snapshot(self, version: str, user_id: str) -> str:
        return f"{self._version(version)}:u:{{{self.user_tag(user_id)}}}:snap"

    def version_pattern(self, version: str) -> str:
        """A SCAN MATCH pattern for every key of `version`."""
        return f"{_glob_escape(self._version(version))}:*"

    def live(self, user_id: str) -> str:
        return f"{self.prefix}:u:{{{self.user_tag(user_id)}}}:live"

    def seen(self, user_id: str, slice_id: int) -> str:
        return f"{self.prefix}:u:{{{self.user_tag(user_id)}}}:seen:{slice_id}"

    def cache(self, user_id: str) -> str:
        return f"{self.prefix}:u:{{{self.user_tag(user_id)}}}:cache"

    def applied(self, user_id: str, token: str) -> str:
        return f"{self.prefix}:u:{{{self.user_tag(user_id)}}}:applied:{token}"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}:evt:{event_id}"

    def events_log(self) -> str:
        return f"{self.prefix}:events"

    def log_applied(self, token: str) -> str:
        # The stream's whole name as the hash tag: the slot of `P:events`, which has no braces.
        return f"{self.prefix}:events:applied:{{{self.events_log()}}}:{token}"

    def catalogue(self, part: str) -> str:
        """One of the live catalogue's keys: items, ordinals, next, withdrawn, rev, impressions."""
        return f"{self.prefix}:{{catalogue}}:{part}"


class RedisFeatureStore:
    """The feature store on Redis at `url` (`redis://`, `rediss://`, `unix://`; cluster with
    `redis+cluster://` or `?cluster=1`), every key under `prefix`."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        policy: LiveDataPolicy | None = None,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT,
    ) -> None:
        for name, value in (
            ("read_timeout", read_timeout),
            ("write_timeout", write_timeout),
            ("connection_timeout", connection_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name}: expected seconds > 0, got {value!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections: expected at least 1, got {max_connections!r}")
        self.keys = RedisKeys(prefix)
        self.policy = policy or LiveDataPolicy()
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        target, self.cluster = parse_redis_url(url)
        self.url = redact_url(url)
        # Two pools, so that a read never waits behind the longer timeout of a write. A pool
        # waits for a free connection at most as long as its calls' budget.
        self._reads = _client(target, self.cluster, read_timeout, connection_timeout, max_connections)
        self._writes = _client(target, self.cluster, write_timeout, connection_timeout, max_connections)
        self.connection_timeout = connection_timeout
        self._cluster_known = not self.cluster
        self._cluster_learning = asyncio.Lock()
        self._cluster_unknown_since = -math.inf  # when learning the cluster last failed
        self._background: set[asyncio.Future[Any]] = set()
        self.abandoned_calls = 0  # calls whose caller stopped waiting before Redis answered
        self.topology_refreshes = 0  # cluster slot maps re-read after a node failed
        self.write_retries = 0  # attempts of event writes made again (`_write`)
        self._refreshing: dict[int, asyncio.Task[None]] = {}
        self._last_refresh: dict[int, float] = {}
        self._take_cache = self._writes.register_script(_TAKE_CACHE)
        self._put_cache = self._writes.register_script(_PUT_CACHE)
        self._release_lock = self._writes.register_script(_RELEASE_LOCK)
        self._upsert_items = self._writes.register_script(_UPSERT_ITEMS)
        self._withdraw_items = self._writes.register_script(_WITHDRAW_ITEMS)
        self._record_engagers = self._writes.register_script(_RECORD_ENGAGERS)
        self._add_item_impressions = self._writes.register_script(_ADD_ITEM_IMPRESSIONS)
        self._append_events = self._writes.register_script(_APPEND_EVENTS)
        self._log_append = self._writes.register_script(_LOG_APPEND)

    def __repr__(self) -> str:
        return f"RedisFeatureStore({self.url!r}, prefix={self.keys.prefix!r})"

    @contextlib.asynccontextmanager
    async def _errors(self, operation: str) -> AsyncIterator[None]:
        """Turn Redis failures into FeatureStoreUnavailable (for unbounded admin work)."""
        try:
            yield
        except _FAILURES as error:
            raise FeatureStoreUnavailable(f"redis at {self.url}: {operation}: {error}") from error

    async def _call(self, operation: str, budget: float, command: Awaitable[T]) -> T:
        """Run one command (or pipeline) with `budget` seconds as its one timeout.

        The caller stops waiting at the budget, or when it is cancelled itself, but the
        command is never cancelled: redis-py closes a connection whose read is interrupted,
        so cutting slow replies off would turn a slow Redis into a reconnect storm, each new
        connection meeting the same slowness. The command finishes in the background instead
        and its connection goes back to the pool; the pool is bounded and waiting for a
        connection is bounded by the budget too, so a slow Redis costs at most
        `max_connections` connections and calls beyond them fail fast."""
        if not self._cluster_known:
            try:
                await self._learn_cluster()
            except BaseException:
                if asyncio.iscoroutine(command):
                    command.close()  # never sent
                raise
        task = asyncio.ensure_future(command)
        try:
            return await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            raise FeatureStoreUnavailable(
                f"redis at {self.url}: {operation}: no answer within {budget * 1000:.0f} ms"
            ) from None
        except _FAILURES as error:
            self.note_failure(error)
            raise FeatureStoreUnavailable(f"redis at {self.url}: {operation}: {error}") from error
        finally:
            if not task.done():
                self.abandoned_calls += 1
                self._background.add(task)
                task.add_done_callback(self._finished_in_background)

    async def _write(self, operation: str, command: Callable[[], Awaitable[T]], deadline: float | None) -> T:
        """`command()` with the write budget; while `deadline` (a `time.monotonic()` instant;
        None: one attempt) allows, made again (`command()` builds a fresh one) after a budget
        run out or a transient error (`_TRANSIENT`).

        Why: a planned failover (`CLUSTER FAILOVER`) pauses writes on the old master until the
        replica has taken over, then answers them MOVED (followed by redis-py within the
        call). A write sent early in the pause needs the pause plus a round trip: on a loaded
        machine more than the 200 ms write budget, and ReportEvents failed. The next attempt
        is held by the rest of the pause and follows the MOVED, or goes to the new master.

        Only for idempotent commands: an attempt that ran out of budget is not cut off (see
        `_call`) and may still be applied, before or after the next one; an attempt whose
        reply was lost was applied. Each retried write here is a SET/DEL/BITFIELD SET of the
        same values, a script that checks before it adds, or marks its call with a token."""
        attempt = 0
        while True:
            budget = self.write_timeout
            if attempt:
                assert deadline is not None
                budget = min(budget, deadline - time.monotonic())
            try:
                return await self._call(operation, budget, command())
            except FeatureStoreUnavailable as error:
                delay = min(_RETRY_DELAY_MAX, _RETRY_DELAY * 2**attempt)
                if (
                    deadline is None
                    or not _transient(error)
                    or deadline - time.monotonic() - delay < _MIN_ATTEMPT_SECONDS
                ):
                    raise
            self.write_retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    async def _learn_cluster(self) -> None:
        """Before the first call to a cluster: learn its nodes and slots (CLUSTER SLOTS, and
        COMMAND, which redis-py reads to find each command's keys; 16–20 ms per client on
        loopback here), bounded by
        `connection_timeout` rather than the call's budget, which it does not fit (a 30 ms
        read failed every process's first call, and the version watcher's first check with
        it, delaying SERVING by a poll). Once per store; when it fails, calls go on within
        their budgets (redis-py then learns the cluster itself) and it is tried again after
        a second, so a cluster that is down at start does not hold every call for a second."""
        loop = asyncio.get_running_loop()
        async with self._cluster_learning:
            if self._cluster_known or loop.time() - self._cluster_unknown_since < 1.0:
                return
            try:
                async with asyncio.timeout(self.connection_timeout):
                    for client in (self._reads, self._writes):
                        assert isinstance(client, RedisCluster)
                        await client.initialize()
            except TimeoutError:
                self._cluster_unknown_since = loop.time()
                raise FeatureStoreUnavailable(
                    f"redis at {self.url}: learning the cluster's slots: "
                    f"no answer within {self.connection_timeout * 1000:.0f} ms"
                ) from None
            except _FAILURES as error:
                self._cluster_unknown_since = loop.time()
                raise FeatureStoreUnavailable(
                    f"redis at {self.url}: learning the cluster's slots: {error}"
                ) from error
            self._cluster_known = True

    def _finished_in_background(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:  # the caller was told already
            self.note_failure(error)

    def note_failure(self, error: BaseException) -> None:
        """After a node failure, re-read the cluster's slot map in the background.

        redis-py re-initialises a cluster client only when a single command meets a
        connection error; a pipeline (every `user_state`, every write of events) that meets
        one just raises, and the client keeps sending that node's slots to a dead address
        even after its replica took over, since a dead node answers no MOVED. So the store
        refreshes the map itself, off the call's budget: the call that met the failure is
        answered at once (the services serve around it) and the calls after the refresh
        go to the new master. Refreshes are single-flight per client and at most one per
        `CLUSTER_REFRESH_INTERVAL` while a node stays down."""
        if (
            not self.cluster
            or isinstance(error, MaxConnectionsError)
            or not isinstance(error, _TOPOLOGY_ERRORS)
        ):
            return
        loop = asyncio.get_running_loop()
        for client in (self._reads, self._writes):
            assert isinstance(client, RedisCluster)
            key = id(client)
            running = self._refreshing.get(key)
            if running is not None and not running.done():
                continue
            if loop.time() - self._last_refresh.get(key, -math.inf) < CLUSTER_REFRESH_INTERVAL:
                continue
            self._last_refresh[key] = loop.time()
            self._refreshing[key] = loop.create_task(self._refresh(client))

    async def _refresh(self, client: RedisCluster) -> None:
        try:
            await client.nodes_manager.initialize()
            self.topology_refreshes += 1
        except _FAILURES as error:
            # Every node unreachable for now; the next failure tries again.
            logger.warning("redis cluster at %s: refreshing the slot map failed: %s", self.url, error)

    # --- version snapshots ---------------------------------------------------------------------
    async def snapshot_ready(self, version: str) -> bool:
        key = self.keys.ready(version)
        return bool(await self._call("snapshot_ready", self.read_timeout, self._reads.exists(key)))

    async def write_snapshots(self, version: str, snapshots: Sequence[tuple[str, bytes]]) -> int:
        """SET packed snapshots (user id, `Snapshot.pack()`) of `version` in one pipeline;
        return the bytes written. Used by push-features; overwrites, so re-running is safe."""
        keys = [self.keys.snapshot(version, user) for user, _ in snapshots]
        pipeline = self._writes.pipeline(transaction=False)
        for key, (_, packed) in zip(keys, snapshots, strict=True):
            pipeline.set(key, packed)
        await self._call("write_snapshots", self.write_timeout, pipeline.execute())
        return sum(len(packed) for _, packed in snapshots)

    async def mark_ready(self, version: str, summary: Mapping[str, Any]) -> None:
        """Set the version's ready marker (its value: `summary` as JSON); never expires."""
        await self._call(
            "mark_ready",
            self.write_timeout,
            self._writes.set(self.keys.ready(version), json.dumps(dict(summary), sort_keys=True)),
        )

    async def acquire_push_lock(self, version: str, owner: str, seconds: int) -> bool:
        """Take the version's push lock (SET NX EX), so that of the processes that find its
        features missing only one pushes them again; it expires if its holder dies."""
        key = self.keys.push_lock(version)
        taken = await self._call(
            "push_lock", self.write_timeout, self._writes.set(key, owner, nx=True, ex=seconds)
        )
        return bool(taken)

    async def release_push_lock(self, version: str, owner: str) -> None:
        """Release the lock if `owner` still holds it (never another holder's, taken after ours expired)."""
        key = self.keys.push_lock(version)
        await self._call("push_unlock", self.write_timeout, self._release_lock(keys=[key], args=[owner]))

    async def ready_summary(self, version: str) -> dict[str, Any] | None:
        """What `mark_ready` stored, or None when the version is not ready."""
        value = await self._call(
            "ready_summary", self.read_timeout, self._reads.get(self.keys.ready(version))
        )
        if value is None:
            return None
        summary: dict[str, Any] = json.loads(value)
        return summary

    async def delete_version(self, version: str) -> int:
        ready = self.keys.ready(version)
        pattern = self.keys.version_pattern(version)
        deleted = 0
        # Unbounded overall (a version can have millions of keys); each command is bounded
        # by the write client's socket timeout.
        async with self._errors("delete_version"):
            deleted += int(await self._writes.unlink(ready))  # first: no reader trusts a partial version
            batch: list[bytes] = []
            async for key in self._writes.scan_iter(match=pattern, count=1_000):
                batch.append(key)
                if len(batch) >= _UNLINK_BATCH:
                    deleted += await self._unlink(batch)
                    batch = []
            if batch:
                deleted += await self._unlink(batch)
        return deleted

    async def _unlink(self, keys: Sequence[bytes]) -> int:
        # One UNLINK per key: in a cluster the keys of a version live in every slot (the
        # cluster pipeline sends each node its own). A raw command, because a cluster
        # pipeline's `unlink` is a coroutine of its own that queues nothing.
        pipeline = self._writes.pipeline(transaction=False)
        for key in keys:
            pipeline.execute_command("UNLINK", key)
        return sum(int(count) for count in await pipeline.execute())

    # --- reads ----------------------------------------------------------------------------------
    async def user_state(self, version: str, user_id: str, *, now: float, live_limit: int = 200) -> UserState:
        (state,) = await self.users_states(version, [user_id], now=now, live_limit=live_limit)
        return state

    async def users_states(
        self, version: str, user_ids: Sequence[str], *, now: float, live_limit: int = 200
    ) -> list[UserState]:
        if not user_ids:
            return []
        window = self.policy.exposures.window(now)
        pipeline = self._reads.pipeline(transaction=False)
        for user in user_ids:
            pipeline.get(self.keys.snapshot(version, user))
            if live_limit > 0:  # LRANGE key -0 -1 would be the whole list
                pipeline.lrange(self.keys.live(user), -live_limit, -1)
            # As a raw command: redis-py refuses `pipeline.mget` in cluster mode (it cannot know
            # the keys share a slot); these do, through the user's hash tag.
            pipeline.execute_command("MGET", *[self.keys.seen(user, slice_id) for slice_id in window])
            pipeline.hgetall(self.keys.cache(user))
        replies = await self._call("user_state", self.read_timeout, pipeline.execute(raise_on_error=False))
        states = []
        reply = iter(replies)
        for user in user_ids:
            snapshot = next(reply)
            live = next(reply) if live_limit > 0 else []
            seen, cache = next(reply), next(reply)
            states.append(self._user_state(version, user, now, live_limit, snapshot, live, seen, cache))
        return states

    def _user_state(
        self,
        version: str,
        user: str,
        now: float,
        live_limit: int,
        snapshot: Any,
        live: Any,
        seen: Any,
        cache: Any,
    ) -> UserState:
        for name, reply in (("snapshot", snapshot), ("live history", live)):
            if isinstance(reply, Exception):
                self.note_failure(reply)
                raise FeatureStoreUnavailable(f"redis at {self.url}: reading the {name} of a user: {reply}")
        try:
            unpacked = Snapshot.empty() if snapshot is None else Snapshot.unpack(snapshot)
            events = [LiveEvent.unpack(data) for data in live]
        except ValueError as error:
            raise FeatureStoreUnavailable(
                f"redis at {self.url}: unreadable data for user {user!r} in version {version!r}: {error}"
            ) from None
        if isinstance(seen, Exception):
            logger.warning("exposures of user %r unreadable, serving without them: %s", user, seen)
            exposures = None
        else:
            exposures = self.policy.exposures.snapshot(seen)
        if isinstance(cache, Exception):
            logger.warning("cache of user %r unreadable, serving without it: %s", user, cache)
            cache = {}
        return UserState(
            snapshot=unpacked,
            live_events=newest_last(events, live_limit),
            exposure_filter=exposures,
            cache_items=tuple(best_first(self._alive_cache(cache, now))),
        )

    def _alive_cache(self, cache: Mapping[bytes, bytes], now: float) -> list[tuple[str, float]]:
        alive = []
        for item, packed in cache.items():
            score, added, uses = CACHE_ENTRY.unpack(packed)
            if cache_entry_alive(added, uses, now, self.policy):
                alive.append((item.decode("utf-8"), score))
        return alive

    # --- writes ---------------------------------------------------------------------------------
    async def append_events(
        self, user_id: str, events: Sequence[LiveEvent], *, deadline: float | None = None
    ) -> None:
        if not events:
            return
        # A token for this call: every attempt carries it, and the script applies the first
        # attempt Redis runs, never a second (an RPUSH sent again would add the events twice).
        keys = [self.keys.live(user_id), self.keys.applied(user_id, uuid.uuid4().hex)]
        arguments: list[int | bytes] = [
            _marker_seconds(deadline),
            self.policy.live_max_length,
            self.policy.live_ttl_seconds or 0,
            *[event.pack() for event in events],
        ]
        await self._write("append_events", lambda: self._append_events(keys=keys, args=arguments), deadline)

    async def mark_events_seen(
        self, event_ids: Sequence[str], ttl_seconds: int, *, deadline: float | None = None
    ) -> list[bool]:
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds: expected at least 1, got {ttl_seconds}")
        if not event_ids:
            return []
        # Each key holds the token of the call that marked it, and SET … NX GET answers the
        # value it found (Redis >= 7.0 for NX with GET): an id this call's earlier attempt
        # marked (applied, its reply lost or late) is still this call's, not a duplicate, which
        # a plain SET NX sent again would have answered (and the event been dropped).
        token = uuid.uuid4().hex.encode()

        def command() -> Awaitable[list[Any]]:
            pipeline = self._writes.pipeline(transaction=False)
            for event_id in event_ids:
                pipeline.set(self.keys.event(event_id), token, nx=True, get=True, ex=ttl_seconds)
            return pipeline.execute()

        replies = await self._write("mark_events_seen", command, deadline)
        # An id twice in one call: its second SET finds this call's token too, yet is a duplicate.
        first: list[bool] = []
        marked: set[str] = set()
        for event_id, reply in zip(event_ids, replies, strict=True):
            first.append((reply is None or reply == token) and event_id not in marked)
            marked.add(event_id)
        return first

    async def forget_events(self, event_ids: Sequence[str], *, deadline: float | None = None) -> None:
        if not event_ids:
            return

        def command() -> Awaitable[list[Any]]:
            pipeline = self._writes.pipeline(transaction=False)
            for event_id in event_ids:  # one DEL per key: in a cluster the ids live in different slots
                pipeline.delete(self.keys.event(event_id))
            return pipeline.execute()

        await self._write("forget_events", command, deadline)

    async def record_exposures(
        self, user_id: str, item_ids: Sequence[str], now: float, *, deadline: float | None = None
    ) -> None:
        if not item_ids:
            return
        exposures = self.policy.exposures
        slice_id = exposures.slice_of(now)
        key = self.keys.seen(user_id, slice_id)
        positions = sorted(set(exposures.positions(item_ids).reshape(-1).tolist()))
        arguments: list[str | int] = []
        for position in positions:
            arguments += ["SET", "u1", position, 1]
        # Adding 0 to the last bit sets nothing but makes Redis size the string to m/8 bytes.
        arguments += ["INCRBY", "u1", exposures.bits - 1, 0]
        ttl = exposures.ttl_seconds(slice_id, now)

        def command() -> Awaitable[list[Any]]:  # bits set and a TTL: the same however often
            pipeline = self._writes.pipeline(transaction=not self.cluster)
            pipeline.execute_command("BITFIELD", key, *arguments)
            pipeline.expire(key, ttl)
            return pipeline.execute()

        await self._write("record_exposures", command, deadline)

    async def put_cache(self, user_id: str, items: Sequence[tuple[str, float]], now: float) -> None:
        if not items:
            return
        policy = self.policy
        arguments: list[str | int | float] = [
            repr(float(now)),
            policy.cache_max_items,
            max(1, math.ceil(policy.cache_max_age_seconds)),
            repr(float(policy.cache_max_age_seconds)),
            policy.cache_max_uses,
        ]
        for item, score in items:
            if not math.isfinite(score):
                raise ValueError(f"items: the score of {item!r} is not finite ({score!r})")
            arguments += [item, repr(float(score))]
        await self._call(
            "put_cache", self.write_timeout, self._put_cache(keys=[self.keys.cache(user_id)], args=arguments)
        )

    async def take_cache(self, user_id: str, limit: int, now: float) -> list[tuple[str, float]]:
        if limit <= 0:
            return []
        policy = self.policy
        arguments: list[str | int] = [
            limit,
            repr(float(now)),
            repr(float(policy.cache_max_age_seconds)),
            policy.cache_max_uses,
        ]
        flat = await self._call(
            "take_cache",
            self.write_timeout,
            self._take_cache(keys=[self.keys.cache(user_id)], args=arguments),
        )
        return [
            (flat[index].decode("utf-8"), _SCORE.unpack(flat[index + 1])[0])
            for index in range(0, len(flat), 2)
        ]

    # --- the live catalogue ---------------------------------------------------------------------
    async def upsert_items(self, items: Sequence[CatalogueItem], now: float) -> list[tuple[int, bool]]:
        if not items:
            return []
        arguments: list[str] = [repr(float(now))]
        for item in items:
            arguments += [item.item_id, item.to_json(now)]
        keys = [self.keys.catalogue(part) for part in ("items", "ordinals", "next", "withdrawn", "rev")]
        flat = await self._call(
            "upsert_items", self.write_timeout, self._upsert_items(keys=keys, args=arguments)
        )
        return [(int(flat[index]), bool(flat[index + 1])) for index in range(0, len(flat), 2)]

    async def withdraw_items(self, item_ids: Sequence[str], now: float) -> list[bool]:
        if not item_ids:
            return []
        keys = [self.keys.catalogue("withdrawn"), self.keys.catalogue("rev")]
        flat = await self._call(
            "withdraw_items",
            self.write_timeout,
            self._withdraw_items(keys=keys, args=[repr(float(now)), *item_ids]),
        )
        return [bool(value) for value in flat]

    async def catalogue_revision(self) -> int:
        value = await self._call(
            "catalogue_revision", self.read_timeout, self._reads.get(self.keys.catalogue("rev"))
        )
        return 0 if value is None else int(value)

    async def catalogue_state(self) -> CatalogueState:
        # Read with the write budget: a poll off the request path, and a catalogue of many
        # thousand items is more than a user's read.
        pipeline = self._reads.pipeline(transaction=not self.cluster)
        pipeline.get(self.keys.catalogue("rev"))
        pipeline.hgetall(self.keys.catalogue("items"))
        pipeline.hgetall(self.keys.catalogue("ordinals"))
        pipeline.hgetall(self.keys.catalogue("withdrawn"))
        revision, records, ordinals, withdrawn = await self._call(
            "catalogue_state", max(self.read_timeout, self.write_timeout), pipeline.execute()
        )
        stored = []
        for raw_id, text in records.items():
            item_id = raw_id.decode("utf-8")
            ordinal = ordinals.get(raw_id)
            if ordinal is None:  # the script writes both at once: only a hand-made key lacks it
                continue
            try:
                item, upserted_at = CatalogueItem.from_json(item_id, text)
            except ValueError as error:
                logger.warning("catalogue item %r unreadable, skipped: %s", item_id, error)
                continue
            stored.append(StoredItem(item, int(ordinal), upserted_at))
        stored.sort(key=lambda entry: entry.ordinal)
        return CatalogueState(
            0 if revision is None else int(revision),
            tuple(stored),
            frozenset(raw.decode("utf-8") for raw in withdrawn),
        )

    # --- the look-alike channel's engagers -------------------------------------------------------
    async def record_engagers(
        self, engagements: Sequence[tuple[str, str]], limit: int, *, deadline: float | None = None
    ) -> int:
        if limit < 1:
            raise ValueError(f"limit: expected at least 1, got {limit}")
        if not engagements:
            return 0
        arguments = [str(limit)]
        for item_id, user_id in engagements:
            arguments += [item_id, user_id]
        keys = [self.keys.catalogue("engagers"), self.keys.catalogue("engagers-rev")]
        # Safe to send again: the script adds no user an item has already.
        added = await self._write(
            "record_engagers", lambda: self._record_engagers(keys=keys, args=arguments), deadline
        )
        return int(added)

    async def engagers_revision(self) -> int:
        value = await self._call(
            "engagers_revision", self.read_timeout, self._reads.get(self.keys.catalogue("engagers-rev"))
        )
        return 0 if value is None else int(value)

    async def engagers(self) -> dict[str, tuple[str, ...]]:
        # A poll off the request path (as catalogue_state): the write budget.
        records = await self._call(
            "engagers",
            max(self.read_timeout, self.write_timeout),
            self._reads.hgetall(self.keys.catalogue("engagers")),
        )
        result: dict[str, tuple[str, ...]] = {}
        for raw_id, text in records.items():
            try:
                users = json.loads(text)
            except ValueError as error:
                logger.warning("engagers of %r unreadable, skipped: %s", raw_id, error)
                continue
            if isinstance(users, list) and users:  # cjson writes an empty array as {}
                item_id = raw_id.decode("utf-8") if isinstance(raw_id, bytes) else str(raw_id)
                result[item_id] = tuple(str(user) for user in users)
        return result

    async def add_item_impressions(self, counts: Mapping[str, int]) -> None:
        if not counts:
            return
        arguments: list[str] = []
        for item_id, count in counts.items():
            arguments += [item_id, str(int(count))]
        keys = [self.keys.catalogue("items"), self.keys.catalogue("impressions")]
        await self._call(
            "add_item_impressions", self.write_timeout, self._add_item_impressions(keys=keys, args=arguments)
        )

    async def item_impressions(self, item_ids: Sequence[str]) -> list[int]:
        if not item_ids:
            return []
        # A poll off the request path, for every young new item at once: the write budget.
        values = await self._call(
            "item_impressions",
            max(self.read_timeout, self.write_timeout),
            self._reads.hmget(self.keys.catalogue("impressions"), list(item_ids)),
        )
        return [0 if value is None else int(value) for value in values]

    # --- the durable event log (see recsys.feature_store.event_log) ----------------------------
    async def log_append(
        self, entries: Sequence[Mapping[str, str]], max_length: int, *, deadline: float | None = None
    ) -> None:
        """XADD each entry (field → value) to the event stream, approximately capped; once
        per call however often it is retried (a token, as `append_events`)."""
        if not entries:
            return
        keys = [self.keys.events_log(), self.keys.log_applied(uuid.uuid4().hex)]
        arguments: list[int | str] = [_marker_seconds(deadline), max_length]
        for entry in entries:
            arguments.append(len(entry))
            for name, value in entry.items():
                arguments += [name, value]
        await self._write("log_append", lambda: self._log_append(keys=keys, args=arguments), deadline)

    async def log_read(self, limit: int | None) -> list[dict[str, str]]:
        """The oldest `limit` entries of the event stream (all when None)."""
        key = self.keys.events_log()
        async with self._errors("log_read"):
            replies: list[tuple[bytes, dict[bytes, bytes]]] = await self._reads.xrange(key, count=limit)  # type: ignore[assignment]
        return [
            {field.decode("utf-8"): value.decode("utf-8") for field, value in fields.items()}
            for _, fields in replies
        ]

    async def close(self) -> None:
        for task in [*self._background, *self._refreshing.values()]:
            task.cancel()
        for client in (self._reads, self._writes):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


def _transient(error: FeatureStoreUnavailable) -> bool:
    """Whether a failed call is worth another attempt: its budget ran out (raised `from None`)
    or Redis failed the way a failover makes it fail."""
    return error.__cause__ is None or isinstance(error.__cause__, _TRANSIENT)


def _marker_seconds(deadline: float | None) -> int:
    """The TTL of a retried write's marker: past the last attempt by WRITE_MARKER_SECONDS."""
    left = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
    return math.ceil(left) + WRITE_MARKER_SECONDS


# --- URLs and clients ---------------------------------------------------------------------------
def parse_redis_url(url: str) -> tuple[str, bool]:
    """(the URL redis-py understands, whether it names a cluster). A cluster is named by the
    scheme `redis+cluster://` (or `rediss+cluster://`) or the query parameter `cluster=1`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r} in {redact_url(url)!r}: "
            "expected redis://, rediss://, unix:// or redis+cluster://"
        )
    cluster = scheme.endswith("+cluster")
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "cluster":
            cluster = cluster or value.lower() in ("1", "true", "yes")
        else:
            query.append((name, value))
    if cluster and scheme == "unix":
        raise ValueError("a Redis Cluster cannot be reached through a unix:// socket")
    return urlunsplit(
        (scheme.removesuffix("+cluster"), parts.netloc, parts.path, urlencode(query), "")
    ), cluster


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def _client(
    url: str, cluster: bool, budget: float, connection_timeout: float, max_connections: int
) -> Client:
    # The socket timeouts are the connection's health bound (a reply this late means the
    # connection is broken), not a call's timeout: calls are bounded by their budget
    # (`RedisFeatureStore._call`), which must be shorter.
    socket_timeout = max(connection_timeout, budget)
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "max_connections": max_connections,
    }
    if cluster:
        # reinitialize_steps=0: redis-py's default answers every fifth MOVED by closing every
        # connection of the client, in-flight calls' included, which during a failover fails
        # calls of other users on healthy masters. Each MOVED patches its slot instead (one
        # more round trip per slot, within the call); a dead node makes the store re-read
        # the whole map (`RedisFeatureStore.note_failure`).
        return RedisCluster.from_url(url, reinitialize_steps=0, **options)
    # Blocking: past `max_connections` a call waits (within its budget) for a connection to
    # come back instead of opening one more.
    pool = BlockingConnectionPool.from_url(url, timeout=budget, **options)
    return Redis.from_pool(pool)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
