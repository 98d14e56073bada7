"""The semantic cache: an hnswlib index of request embeddings beside a diskcache store of the answers.

Layout of a folder (next to the shared store's `entries/` and `meta/` databases):

- `index.bin`: the hnswlib index (cosine space), saved every `save_every` additions and on `close()`, written to a
  temporary file and renamed; `index.json` records its xxh3 checksum, the embedder fingerprint and the highest label
  it contains. An index whose checksum, embedder or dimension does not match is rebuilt from the store (logged).
- each answer is one checked entry (safetensors + JSON, never pickle) holding the generated tokens, the request's
  embedding and its text, under a key made of the request text and its *context*;
- `meta/` holds a record per label (`label:N` -> entry key, context and text) and the next free label.

Writes go entry first, then its label record; an entry without a record (a crash in between) is never found and is
evicted with time; a record whose entry is gone (evicted, expired or bad) is dropped from the index on the lookup that
finds it. Each process keeps its own copy of the index in memory and catches up with the labels other processes added
(read from their records) at most every `refresh_seconds`; label numbers are handed out atomically (SQLite).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

import hnswlib
import numpy as np
import torch
import xxhash

from ..hooks.fingerprint import digest, model_fingerprint
from ..hooks.generate import _CHAT_USER_MARKERS
from ..hooks.inference import entry_from_output, is_time_dependent, output_from_entry, stream
from ..hooks.storage import Counters, StoreBackedCache, TieredStore

logger = logging.getLogger("hf_neuralcache.semantic")

__all__ = ["SemanticCache"]

_GiB = 1 << 30


class SemanticCache(StoreBackedCache):
    """Answers a request whose meaning matches a cached one, used through `semantic_cache=` or `attach`.

    A request is matched on its **last user turn** only; everything else that shapes the answer (the system prompt and
    earlier turns, the model fingerprint, every generation setting, the namespace) must be identical, or it is a miss.
    Among the nearest cached requests with cosine similarity >= `threshold`, the first that the look-alike `guard`
    accepts is served: its stored answer, after the new request's own prompt.

    Args:
        directory (`str` or `os.PathLike`): Folder of the index and the answers (shared by processes).
        embedder (*optional*): Turns texts into normalized vectors (`encode(list[str]) -> np.ndarray`, `dim`,
            `fingerprint`); defaults to [`MiniLMEmbedder`] (all-MiniLM-L6-v2, offline).
        threshold (`float`, *optional*): Least cosine similarity; defaults to the calibrated `DEFAULT_THRESHOLD`.
        guard (`str` or guard object, *optional*, defaults to `"strict"`): The look-alike check after the search:
            a strictness (`"strict"`, `"balanced"`, `"off"`) or an object with `check(query, candidate)`.
        namespace (`str`, *optional*): Separates tenants completely.
        max_entries (`int`, *optional*, defaults to 100000): Most answers kept (oldest evicted first).
        disk_bytes (`int`, *optional*, defaults to 1 GiB): Bound of the answers on disk.
        ttl (`float`, *optional*): Seconds an answer lives.
        cache_sampled (`bool`, *optional*, defaults to `False`): Also store answers of `do_sample=True` calls.
        cacheable (`Callable[[str], bool]`, *optional*): Whether a request may be cached (and looked up); defaults
            to `not is_time_dependent(text)`, as the inference cache.
        tokenizer (*optional*): Decodes prompts when the call and `attach` bring none (a tokenizer is required).
        M (`int`, *optional*, defaults to 16), ef_construction (`int`, *optional*, defaults to 200): hnswlib build
            parameters.
        ef (`int`, *optional*, defaults to 64): hnswlib search breadth.
        candidates (`int`, *optional*, defaults to 8): Nearest neighbours examined per lookup.

    `stats()` counts `hits`, `misses`, `near_misses` (a candidate above the threshold that the guard rejected),
    `bypassed`, `not_cacheable`, `bytes_stored` and `seconds_saved`; `entries` is the number of indexed answers.
    """

    save_every = 1000
    refresh_seconds = 1.0

    def __init__(
        self,
        directory,
        embedder=None,
        threshold: float | None = None,
        guard="strict",
        namespace: str | None = None,
        max_entries: int = 100_000,
        disk_bytes: int = _GiB,
        ttl: float | None = None,
        cache_sampled: bool = False,
        cacheable: Callable[[str | None], bool] | None = None,
        tokenizer=None,
        M: int = 16,  # noqa: N803 - hnswlib's name
        ef_construction: int = 200,
        ef: int = 64,
        candidates: int = 8,
    ):
        if threshold is None:
            from .calibration import DEFAULT_THRESHOLD as threshold
        if not isinstance(threshold, int | float) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
        for name, value in (("max_entries", max_entries), ("M", M), ("ef_construction", ef_construction),
                            ("ef", ef), ("candidates", candidates)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0):
            raise ValueError(f"ttl must be seconds > 0 or None, got {ttl!r}")
        if embedder is None:
            from .embedders import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        if isinstance(guard, str):
            from .guard import LookAlikeGuard

            guard = LookAlikeGuard(guard)
        self.embedder, self.guard = embedder, guard
        if not callable(getattr(self.guard, "check", None)):
            raise ValueError(
                f"guard must be a strictness name or an object with check(query, candidate), got {guard!r}"
            )
        self.threshold = float(threshold)
        self.namespace, self.max_entries, self.ttl = namespace, max_entries, ttl
        self.cache_sampled, self.tokenizer = cache_sampled, tokenizer
        self.cacheable = cacheable or (lambda text: not is_time_dependent(text))
        self.M, self.ef_construction, self.ef, self.candidates = M, ef_construction, ef, candidates
        self.store = TieredStore(directory, "semantic", disk_bytes, 0, "least-recently-used")
        self.counters = Counters(
            self.store, ("hits", "misses", "near_misses", "bypassed", "not_cacheable", "bytes_stored", "seconds_saved")
        )
        self._lock = threading.RLock()
        self._labels: dict[int, dict] = {}  # label -> {"key", "context", "request"} of the labels in the index
        self._seen = -1  # highest label number read from the records
        self._unrecorded: dict[int, float] = {}  # labels handed out without a record yet -> when first noticed
        self._checked = 0.0
        self._open_index()

    # ---- the index ----------------------------------------------------------------------------------------------
    @property
    def _index_path(self):
        return self.store.directory / "index.bin"

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.embedder.dim)
        index.init_index(max_elements=max(capacity, 1024), M=self.M, ef_construction=self.ef_construction)
        index.set_ef(self.ef)
        return index

    def _open_index(self) -> None:
        info_path = self.store.directory / "index.json"
        self.index, upto = None, -1
        try:
            info = json.loads(info_path.read_text())
            data = self._index_path.read_bytes()
            if info["embedder"] != self.embedder.fingerprint or info["dim"] != self.embedder.dim:
                raise ValueError("the index was built with another embedder")
            if xxhash.xxh3_128_hexdigest(data) != info["checksum"]:
                raise ValueError("checksum mismatch")
            index = hnswlib.Index(space="cosine", dim=self.embedder.dim)
            index.load_index(
                str(self._index_path), max_elements=max(info["capacity"], 1024), allow_replace_deleted=False
            )
            index.set_ef(self.ef)
            self.index, upto = index, info["upto"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            logger.warning(
                "hf_neuralcache: semantic index in %s unusable (%s); rebuilding it", self.store.directory, err
            )
        if self.index is None:
            self.index = self._new_index(1024)
        self._catch_up(index_upto=upto)

    def _catch_up(self, index_upto: int = -1) -> None:
        """Read the label records this process has not seen; add the ones the index lacks.

        A label handed out but not recorded yet (another process between its two writes) is retried for a minute.
        """
        with self._lock:
            now = time.monotonic()
            top = self.store.read_record("next_label").get("value", 0) - 1
            todo = sorted(set(range(self._seen + 1, top + 1)) | set(self._unrecorded))
            for label in todo:
                record = self.store.read_record(f"label:{label}")
                if not record:
                    if label <= index_upto:  # in the saved index, deleted since
                        self._mark_deleted(label)
                    elif now - self._unrecorded.setdefault(label, now) > 60:
                        del self._unrecorded[label]  # its writer died between the two writes
                    continue
                self._unrecorded.pop(label, None)
                if label > index_upto:
                    entry = self.store.get(record["key"])
                    if entry is None:  # evicted, expired or bad since
                        self.store.meta.delete(f"label:{label}", retry=True)
                        continue
                    if entry.meta.get("embedder") == self.embedder.fingerprint:
                        vector = entry.tensors["embedding"].numpy()
                    else:  # stored by a process with another embedder: embed its text again
                        vector = self.embedder.encode([record["request"]])[0]
                    self._add_vector(label, vector)
                self._labels[label] = record
            self._seen = max(self._seen, top)
            self._checked = now

    def _add_vector(self, label: int, vector: np.ndarray) -> None:
        if self.index.get_current_count() >= self.index.get_max_elements():
            self.index.resize_index(2 * self.index.get_max_elements())
        self.index.add_items(vector.reshape(1, -1).astype(np.float32), np.array([label]))

    def save(self) -> None:
        """Write the index to the folder (atomically); lookups do not need it, it only speeds up the next start."""
        with self._lock:
            tmp = self._index_path.with_name(f".index.{os.getpid()}.tmp")
            self.index.save_index(str(tmp))
            info = {
                "checksum": xxhash.xxh3_128_hexdigest(tmp.read_bytes()),
                "embedder": self.embedder.fingerprint,
                "dim": self.embedder.dim,
                "capacity": self.index.get_max_elements(),
                "upto": self._seen,
            }
            info_tmp = tmp.with_suffix(".json.tmp")
            info_tmp.write_text(json.dumps(info))
            os.replace(tmp, self._index_path)
            os.replace(info_tmp, self.store.directory / "index.json")

    def _mark_deleted(self, label: int) -> None:
        try:
            self.index.mark_deleted(label)
        except RuntimeError:  # not in the index, or already deleted
            pass

    def _forget(self, label: int) -> None:
        with self._lock:
            if self._labels.pop(label, None) is not None:
                self._mark_deleted(label)
        self.store.meta.delete(f"label:{label}", retry=True)

    # ---- requests -----------------------------------------------------------------------------------------------
    def describe(self, model, request, tokenizer=None) -> tuple[str, str] | None:
        """`(request_text, context_key)` of a call, or `None` when it cannot take part (see the class docstring)."""
        tokenizer = request.tokenizer or tokenizer or self.tokenizer
        if tokenizer is None or request.uncacheable or request.input_ids.shape[0] != 1:
            return None
        config = request.generation_config
        if (config.do_sample and not self.cache_sampled) or (config.num_return_sequences or 1) > 1:
            return None
        full = tokenizer.decode(request.input_ids[0][request.attention_mask[0].bool()])
        cut = max((full.rfind(m) + len(m) for m in _CHAT_USER_MARKERS if m in full), default=0)
        turn = full[cut:]
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in turn]
        end = min((turn.find(t) for t in specials), default=len(turn))
        text = turn[:end].strip()
        if not text:
            return None
        context = digest(
            "semantic-context", model_fingerprint(model), self.namespace or "", config.to_dict(), request.extra,
            full[:cut], turn[end:],
        )  # fmt: skip
        return text, context

    def get(self, model, request, tokenizer=None):
        """The stored answer for a request that means the same as this one, or `None`."""
        described = self.describe(model, request, tokenizer)
        if described is None:
            self.counters.add("bypassed", 1)
            return None
        text, context = described
        if not self.cacheable(text):
            self.counters.add("not_cacheable", 1)
            return None
        if time.monotonic() - self._checked > self.refresh_seconds:
            self._catch_up()
        with self._lock:
            live = len(self._labels)
            if live == 0:
                self.counters.add("misses", 1)
                return None
            vector = self.embedder.encode([text])
            labels, distances = self.index.knn_query(vector, k=min(self.candidates, live))
        rejected = False
        for label, distance in zip(labels[0].tolist(), distances[0].tolist(), strict=True):
            if 1.0 - distance < self.threshold:
                break
            record = self._labels.get(label)
            if record is None or record["context"] != context:
                continue
            if not self.guard.check(text, record["request"]).ok:
                rejected = True
                continue
            entry = self.store.get(record["key"])
            if entry is None:  # evicted, expired or bad since it was indexed
                self._forget(label)
                continue
            prompt = request.input_ids
            new = entry.tensors["new_tokens"].to(prompt.device, copy=True)
            output = output_from_entry(entry.tensors, entry.meta, prompt.device, torch.cat([prompt, new], dim=1))
            if output is None:
                continue
            self.counters.add("hits", 1)
            self.counters.add("seconds_saved", entry.meta.get("seconds", 0.0))
            stream(request, output)
            return output
        self.counters.add("near_misses" if rejected else "misses", 1)
        return None

    def put(self, model, request, output, seconds: float, tokenizer=None) -> None:
        """Store the answer of a call that missed (no-op for calls that cannot take part or are not cacheable)."""
        described = self.describe(model, request, tokenizer)
        if described is None:
            return
        text, context = described
        if not self.cacheable(text):
            return
        stored = entry_from_output(output)
        if stored is None:
            return
        tensors, meta = stored
        sequences = tensors.pop("sequences")
        tensors["new_tokens"] = sequences[:, request.input_ids.shape[1] :]
        vector = self.embedder.encode([text])[0]
        tensors["embedding"] = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        key = digest("semantic-entry", context, text)
        if self.store.contains(key):
            return
        label = self.store.update_record("next_label", lambda r: {"value": r.get("value", 0) + 1})["value"] - 1
        meta.update(seconds=seconds, label=label, request=text, embedder=self.embedder.fingerprint)
        written = self.store.put(key, tensors, meta, expire=self.ttl)
        if not written:
            return
        record = {"key": key, "context": context, "request": text}
        self.store.update_record(f"label:{label}", lambda r: record)
        self.counters.add("bytes_stored", written)
        with self._lock:
            self._add_vector(label, vector)
            self._labels[label] = record
        self._evict()
        if label % self.save_every == 0:
            self.save()

    def _evict(self) -> None:
        while len(self._labels) > self.max_entries:
            oldest = min(self._labels)
            self.store.delete(self._labels[oldest]["key"])
            self._forget(oldest)

    # ---- operations ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {**super().stats(), "entries": len(self._labels)}

    def clear(self) -> None:
        """Remove every answer, label record and the index."""
        with self._lock:
            super().clear()
            self.store.meta.clear(retry=True)
            for path in (self._index_path, self.store.directory / "index.json"):
                path.unlink(missing_ok=True)
            self.index, self._labels, self._seen = self._new_index(1024), {}, -1

    def close(self) -> None:
        """Save the index and the statistics, and close the folder's database connections."""
        self.save()
        super().close()

    def __repr__(self):
        return f"SemanticCache({str(self.store.directory)!r}, threshold={self.threshold})"
