"""The semantic cache's label records: which answer each index label stands for, kept in the folder's `meta/` store.

- `label:N` -> `{"key", "context", "request", "namespace"}`: the entry key of label N's answer and what it answers.
  Written after the entry; it is the commit point of a store.
- `next_label` -> `{"value": next free number, "pending": {label: time handed out}}`: numbers are handed out in a
  SQLite transaction, so processes never share one; a label stays pending until its record is written (or for
  `pending_seconds`, when its writer died), so that readers wait for it instead of taking it for removed.

All records are JSON through the store's pickle-refusing database, schema-checked when read: a record that is not
what this module writes is treated as missing. A label record is also checked against its own entry key (the key is
a digest of the context and the request), so a planted record cannot point a request at another context's answer.
"""

from __future__ import annotations

import contextlib
import time

from ..hooks.fingerprint import digest
from ..hooks.storage import TieredStore

__all__ = ["LabelRecords", "clear_folder"]

PREFIX = "label:"
COUNTER = "next_label"


class LabelRecords:
    """The label records of one folder (see the module docstring)."""

    def __init__(self, store: TieredStore, pending_seconds: float = 60.0):
        self.store, self.pending_seconds = store, pending_seconds

    def counter(self) -> tuple[int, set[int]]:
        """`(highest label handed out, labels still pending)`."""
        counter = _counter(self.store.read_record(COUNTER))
        now = time.time()
        pending = {int(k) for k, t in counter["pending"].items() if now - t < self.pending_seconds}
        return counter["value"] - 1, pending

    def read(self, label: int) -> dict:
        """The record of `label`, or `{}` when it is missing or not a valid label record."""
        return _label_record(self.store.read_record(f"{PREFIX}{label}"))

    def read_all(self) -> dict[int, dict]:
        """Every valid record of the folder (label -> record)."""
        labels = [int(n[len(PREFIX) :]) for n in self.store.record_names()
                  if n.startswith(PREFIX) and n[len(PREFIX) :].isdigit() and len(n) < 40]  # fmt: skip
        records = {label: self.read(label) for label in labels}
        return {label: record for label, record in records.items() if record}

    def reserve(self, floor: int = 0) -> int:
        """A new label number (at least `floor`, the caller's highest known label + 1, in case the counter was
        lost), marked pending until [`commit`] writes its record."""

        def reserve(counter):
            counter, now = _counter(counter), time.time()
            pending = {k: t for k, t in counter["pending"].items() if now - t < self.pending_seconds}
            value = max(counter["value"], floor)
            return {"value": value + 1, "pending": {**pending, str(value): now}}

        counter = self.store.update_record(COUNTER, reserve)
        return None if counter is None else counter["value"] - 1

    def commit(self, label: int, record: dict | None) -> None:
        """Write the record of `label` (none: the store failed) and clear its pending mark, in one transaction."""

        def done(counter):
            counter = _counter(counter)
            counter["pending"].pop(str(label), None)
            return counter

        self.store.update_record(COUNTER, done, also={f"{PREFIX}{label}": record} if record is not None else None)

    def delete(self, label: int) -> None:
        self.store.delete_record(f"{PREFIX}{label}")


def entry_key(context: str, request: str) -> str:
    """The store key of the answer to `request` in `context`."""
    return digest("semantic-entry", context, request)


def _label_record(record: dict) -> dict:
    fields = ("key", "context", "request")
    if not all(isinstance(record.get(name), str) for name in fields):
        return {}
    if not isinstance(record.get("namespace"), str | None) or record["key"] != entry_key(
        record["context"], record["request"]
    ):
        return {}
    return record


def _counter(record: dict) -> dict:
    value, pending = record.get("value", 0), record.get("pending", {})
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        value = 0
    if not isinstance(pending, dict):
        pending = {}
    pending = {k: t for k, t in pending.items() if k.isdigit() and isinstance(t, int | float)}
    return {"value": value, "pending": pending}


def clear_folder(store: TieredStore) -> int:
    """Remove every answer, record, statistic and the saved index of a semantic folder; returns the answers removed.

    The label counter is kept, so that processes still holding the folder open never see a label number again.
    """
    removed = store.clear()
    value = _counter(store.read_record(COUNTER))["value"]
    store.clear_records(keep={COUNTER: {"value": value}})
    if store.writable("clear index"):
        for name in ("index.bin", "index.json"):
            with contextlib.suppress(OSError):
                (store.directory / name).unlink(missing_ok=True)
    return removed
