"""The semantic cache's label records: which answer each index label stands for, kept in the folder's `meta/` store.

- `label:N` -> `{"key", "context", "request", "namespace"}`: the entry key of label N's answer and what it answers.
  Written after the entry; it is the commit point of a store.
- `next_label` -> `{"value": next free number, "pending": {label: time handed out}}`: numbers are handed out in a
  SQLite transaction, so processes never share one; a label stays pending until its record is written (or for
  `pending_seconds`, when its writer died), so that readers wait for it instead of taking it for removed.

All records are JSON through the store's pickle-refusing database.
"""

from __future__ import annotations

import json
import time

from ..hooks.storage import TieredStore, UnsafeEntryError

__all__ = ["LabelRecords", "clear_folder"]

PREFIX = "label:"
COUNTER = "next_label"


class LabelRecords:
    """The label records of one folder (see the module docstring)."""

    def __init__(self, store: TieredStore, pending_seconds: float = 60.0):
        self.store, self.meta, self.pending_seconds = store, store.meta, pending_seconds

    def counter(self) -> tuple[int, set[int]]:
        """`(highest label handed out, labels still pending)`."""
        counter = self.store.read_record(COUNTER)
        now = time.time()
        pending = {int(k) for k, t in counter.get("pending", {}).items() if now - t < self.pending_seconds}
        return counter.get("value", 0) - 1, pending

    def read(self, label: int) -> dict:
        return self.store.read_record(f"{PREFIX}{label}")

    def read_all(self) -> dict[int, dict]:
        """Every record of the folder (label -> record)."""
        names, iterator = [], self.meta.iterkeys()
        while True:
            try:
                name = next(iterator)
            except StopIteration:
                break
            except UnsafeEntryError:  # a pickled key planted in the folder: skipped, never loaded
                continue
            if isinstance(name, str) and name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
                names.append(name)
        records = {int(name[len(PREFIX) :]): self.store.read_record(name) for name in names}
        return {label: record for label, record in records.items() if record}

    def reserve(self, floor: int = 0) -> int:
        """A new label number (at least `floor`, the caller's highest known label + 1, in case the counter was
        lost), marked pending until [`commit`] writes its record."""

        def reserve(counter):
            now = time.time()
            pending = {k: t for k, t in counter.get("pending", {}).items() if now - t < self.pending_seconds}
            value = max(counter.get("value", 0), floor)
            return {"value": value + 1, "pending": {**pending, str(value): now}}

        return self.store.update_record(COUNTER, reserve)["value"] - 1

    def commit(self, label: int, record: dict | None) -> None:
        """Write the record of `label` (none: the store failed) and clear its pending mark, in one transaction."""

        def done(counter):
            counter.get("pending", {}).pop(str(label), None)
            return counter

        with self.meta.transact(retry=True):
            if record is not None:
                self.meta.set(f"{PREFIX}{label}", json.dumps(record, sort_keys=True), retry=True)
            self.store.update_record(COUNTER, done)

    def delete(self, label: int) -> None:
        self.meta.delete(f"{PREFIX}{label}", retry=True)


def clear_folder(store: TieredStore) -> int:
    """Remove every answer, record, statistic and the saved index of a semantic folder; returns the answers removed.

    The label counter is kept, so that processes still holding the folder open never see a label number again.
    """
    removed = store.clear()
    with store.meta.transact(retry=True):
        value = store.read_record(COUNTER).get("value")
        store.meta.clear(retry=True)
        if value is not None:
            store.meta.set(COUNTER, json.dumps({"value": value}), retry=True)
    for name in ("index.bin", "index.json"):
        (store.directory / name).unlink(missing_ok=True)
    return removed
