"""The semantic cache across hosts: a Redis stream of additions and removals that keeps every host's index in step.

With a remote tier, the answers (the same checked blobs as on disk: tokens, embedding, request text) live in Redis
under `hfnc:semantic:<namespace>:<model>:<key>`, and each store or removal appends one event to the stream
`hfnc#log:semantic:<namespace>:<embedder>` (kept to about `maxlen` events):

    {"op": "add", "key", "context", "request", "namespace", "model", "origin"}   an answer was stored
    {"op": "del", "request", "namespace", "origin"}                              `delete(request)` was called
    {"op": "clear", "namespace", "origin"}                                       `clear()` was called

An event is appended by the background writer after the answer it names, so a reader never sees an addition before
its answer. Every process remembers the id of the last event it read and reads the next ones when it opens and at
most every `refresh_seconds` (see `SemanticCache`). Events are untrusted: each is at most `EVENT_LIMIT` bytes of
JSON, schema-checked, and an addition's key must be the digest of its own context and request (as a label record's);
anything else is skipped and counted as an integrity error. The answer an addition names is checked again when it
is fetched (see `SemanticCache._copy`).

A stream trimmed past a reader's last id, or one that is gone (a Redis restart without persistence), is read again
from its oldest remaining event: additions that were trimmed away are then not taken in (their answers still serve
the host that stored them, and any host that asks Redis for them by key), and a trimmed removal is not applied.
"""

from __future__ import annotations

import json
import logging
import os
import re

from ..hooks.remote import RedisTier
from ..hooks.storage import CorruptEntryError, parse_json_object
from .records import entry_key

logger = logging.getLogger("hf_neuralcache.semantic")

__all__ = ["EVENT_LIMIT", "SharedLog"]

EVENT_LIMIT = 1 << 20  # bytes of one event (its request text included)
BATCH = 256  # events read per round trip
_ID = re.compile(rb"(\d{1,20})-(\d{1,20})")
_MODEL = re.compile(r"[0-9a-zA-Z_.:-]{0,128}")


def _parse_id(value) -> tuple[int, int] | None:
    match = _ID.fullmatch(value) if isinstance(value, bytes) else None
    return None if match is None else (int(match[1]), int(match[2]))


class SharedLog:
    """One process's view of the semantic stream of an embedder and namespace (see the module docstring).

    Args:
        tier ([`RedisTier`]): The semantic cache's remote tier.
        embedder (`str`): The embedder's fingerprint (answers embedded by another embedder go to another stream).
        namespace (`str`, *optional*): The cache's namespace (events of another namespace are refused).
        maxlen (`int`): About how many events the stream keeps.
        failed (`Callable`): `failed(kind, op, err)`, the store's failure counter.
    """

    def __init__(self, tier: RedisTier, embedder: str, namespace: str | None, maxlen: int, failed):
        self.tier, self.namespace, self.maxlen, self.failed = tier, namespace, maxlen, failed
        self.stream = tier.log_key(embedder)
        self.origin = os.urandom(8).hex()  # this process: its own events are skipped when read back
        self.last = (0, 0)  # id of the last event read

    def publish(self, op: str, **fields) -> bool:
        """Append an event (after the writes handed to Redis so far); returns whether it was taken."""
        event = {"op": op, "namespace": self.namespace, "origin": self.origin, **fields}
        data = json.dumps(event, sort_keys=True).encode()
        if len(data) > EVENT_LIMIT:
            logger.info("hf_neuralcache: semantic %s event of %d bytes is not shared (at most %d)", op, len(data),
                        EVENT_LIMIT)  # fmt: skip
            return False
        return self.tier.append(self.stream, data, self.maxlen)

    def read(self) -> tuple[list[dict], bool] | None:
        """`(events, more)`: the valid events of other processes after the last one read, in order, and whether more
        may follow at once; `None` when Redis could not be read (the tier is skipped for a while)."""
        found = self.tier.read_log(self.stream, f"{self.last[0]}-{self.last[1]}", BATCH)
        if found is None:
            return None
        raw, newest = found
        if not raw:
            top = _parse_id(newest)
            if self.last != (0, 0) and (top is None or top < self.last):  # the stream is gone or was made anew
                logger.info("hf_neuralcache: semantic stream %s restarted; reading it from its start", self.stream)
                self.last = (0, 0)
                return [], True
            return [], False
        events = []
        for entry in raw:
            ident = _parse_id(entry[0]) if isinstance(entry, list | tuple) and len(entry) == 2 else None
            if ident is None or ident <= self.last:
                self.failed("integrity", "redis stream", CorruptEntryError("an event id out of order"))
                return events, False
            self.last = ident
            event = self.check(entry[1])
            if event is not None and event["origin"] != self.origin:
                events.append(event)
        return events, len(raw) == BATCH

    def check(self, fields) -> dict | None:
        """The event in a stream entry's fields if it is one this module writes, else `None` (counted)."""
        try:
            data = fields.get(b"e") if isinstance(fields, dict) else None
            if data is None:
                raise CorruptEntryError("a stream entry without an event")
            event = parse_json_object(data, limit=EVENT_LIMIT)
            op = event.get("op")
            strings = {"add": ("key", "context", "request", "model"), "del": ("request",), "clear": ()}.get(op)
            if strings is None:
                raise CorruptEntryError(f"unknown event {str(op)[:20]!r}")
            if not all(isinstance(event.get(name), str) for name in (*strings, "origin")):
                raise CorruptEntryError(f"a {op} event without its fields")
            if event.get("namespace", False) != self.namespace:
                raise CorruptEntryError(f"a {op} event of another namespace")
            if op == "add" and (event["key"] != entry_key(event["context"], event["request"])
                                or not _MODEL.fullmatch(event["model"])):  # fmt: skip
                raise CorruptEntryError("an add event whose key is not its context's and request's")
        except CorruptEntryError as err:
            self.failed("integrity", "redis stream", err)
            return None
        return event
