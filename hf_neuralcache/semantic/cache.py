"""The semantic cache: an hnswlib index of request embeddings beside a diskcache store of the answers.

Each answer is one checked entry of the shared store (safetensors + JSON, never pickle: the generated tokens, the
request's embedding and text) under a key made of the request text and its *context*; its label record (`records.py`)
says which entry an index label stands for, and the index (`index.py`) is saved beside them. A store writes the entry
then the record (the commit point); a removal deletes the entry, the record, then the index label. Whatever a crash
leaves in between causes a miss, never a wrong answer: a label whose entry is gone is dropped when met, an entry
without a record is never found, and a hit checks that its entry answers the candidate's request and that the stored
embedding clears the threshold. Processes share a folder: each keeps its own index in memory and takes in the
records the others added at most every `refresh_seconds`.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from ..hooks.fingerprint import digest, model_fingerprint
from ..hooks.generate import _CHAT_USER_MARKERS
from ..hooks.inference import entry_from_output, is_time_dependent, output_from_entry, stream
from ..hooks.remote import remote_tier
from ..hooks.samples import DEFAULT_SAMPLED_ANSWERS, SampleSlots, sampled_answers_setting
from ..hooks.storage import CorruptEntryError, Counters, StoreBackedCache, TieredStore
from .index import VectorIndex
from .records import LabelRecords, clear_folder, entry_key
from .shared import SharedLog

logger = logging.getLogger("hf_neuralcache.semantic")

__all__ = ["SemanticCache", "default_guard"]

_GiB = 1 << 30


def default_guard(embedder) -> str:
    """The guard of a cache built without `guard=`: `"classifier"` with the default [`MiniLMEmbedder`] (the pair
    classifier was trained on pairs above that embedder's calibrated threshold) when `peft` is installed,
    `"strict+learned"` with another embedder that gives word-piece states, `"strict"` otherwise."""
    from .embedders import MiniLMEmbedder

    if isinstance(embedder, MiniLMEmbedder) and importlib.util.find_spec("peft") is not None:
        return "classifier"
    return "strict+learned" if callable(getattr(embedder, "encode_tokens", None)) else "strict"


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
        guard (`str` or guard object, *optional*): The look-alike check after the search: `"classifier"` (a
            [`PairClassifier`]: the vetoes and word-order checks, then a cross-encoder reading both requests; the
            default with the default [`MiniLMEmbedder`], see [`default_guard`]), `"strict+learned"` (the strict
            guard, then the learned score over the embedder's word-piece states must also reach
            `STRICT_LEARNED_THRESHOLD`; the default with another embedder that has `encode_tokens`), a strictness
            (`"strict"`, the default with other embedders; `"balanced"`, `"order"`, `"vetoes"`, `"off"`),
            `"learned"` (an [`EquivalenceCheck`] alone; experimental) or an object with `check(query, candidate)`.
        namespace (`str`, *optional*): Separates tenants completely.
        max_entries (`int`, *optional*, defaults to 100000): Most answers kept (oldest evicted first).
        disk_bytes (`int`, *optional*, defaults to 1 GiB): Bound of the answers on disk (oldest evicted first).
        ttl (`float`, *optional*): Seconds an answer lives.
        sampled_answers (`int`, *optional*, defaults to 4): Answers kept per sampled (`do_sample=True`) request;
            once that many are stored, a matching call gets one of them at random. `0`: sampled calls bypass.
        cache_sampled (`bool`, *optional*): The older switch: `False` is `sampled_answers=0`, `True` keeps at
            least one.
        cacheable (`Callable[[str], bool]`, *optional*): Whether a request may be cached (and looked up); defaults
            to `not is_time_dependent(text)`, as the inference cache.
        tokenizer (*optional*): Decodes prompts when the call and `attach` bring none (a tokenizer is required).
        M (`int`, *optional*, defaults to 16): hnswlib's graph degree.
        ef_construction (`int`, *optional*, defaults to 200): hnswlib's build breadth.
        ef (`int`, *optional*, defaults to 64): hnswlib's search breadth.
        candidates (`int`, *optional*, defaults to 8): Nearest neighbours examined per lookup.
        guard_checks (`int`, *optional*): Most candidates of one lookup handed to the guard (those above the
            threshold, in the request's context, most similar first); the rest are misses. Defaults to the guard's
            `checks_per_lookup` (1 for [`PairClassifier`], whose every check is a model pass: this bounds a
            lookup's time), else all of them.
        secret (`str` or `bytes`, *optional*): Key with which every answer and the saved index are MACed and verified
            (HMAC-SHA256), for a folder writable by others; defaults to `HF_NEURALCACHE_SECRET`, unset: checksums.
        remote (`str` or [`RedisTier`], *optional*): A shared tier on Redis behind the disk tier
            (`"redis://host:6379/0"`, `"rediss://..."`, `"unix:///path"`; credentials from the URL or
            `HF_NEURALCACHE_REDIS_USERNAME` / `HF_NEURALCACHE_REDIS_PASSWORD`): a local miss looks there, a hit fills
            the local tiers, writes go there in the background. A failing server costs a request at most about
            0.1 s, then is skipped for a while (see the "Sharing caches across machines" docs page).
        remote_bytes (`int`, *optional*): Bound of this cache's kind and namespace in Redis; `None` leaves it to the
            server's `maxmemory` policy.

    **Across hosts.** With `remote=`, answers also go to Redis, and every store, `delete()` and `clear()` appends an
    event to a Redis stream of this embedder and namespace (`semantic/shared.py`). Each process reads the events it
    has not seen when it opens and at most every `refresh_seconds` (1 s) on a lookup: it fetches each new answer
    from Redis, checks it (the blob's checksum or MAC, that it answers the event's request, its embedding), copies
    it into its own folder and indexes it; a removal takes its copies out. An answer stored on one host is therefore
    served on another within about `refresh_seconds` (plus the background write to Redis), without a forward pass.
    Nothing is indexed before its answer is local, so an answer that expired or was removed in Redis before a host
    copied it is a miss there, never an error; a copy keeps the answer's remaining `ttl`. Local bounds
    (`max_entries`, `disk_bytes`) evict only local copies. The stream keeps about `2 * max_entries` events: a host
    that fell further behind (or a Redis that restarted empty) reads what remains, so older answers are then not
    taken in and a trimmed removal is not applied there. A forged or damaged event or answer is skipped and counted
    in `integrity_errors`; Redis being down or hung costs a lookup at most about 0.1 s, and the cache goes on with
    its own folder.

    `stats()` counts `hits`, `misses`, `near_misses` (a candidate above the threshold that the guard rejected),
    `bypassed` (by reason in `bypassed_by`, each logged once), `not_cacheable`, `bytes_stored` and `seconds_saved`,
    and the failures `storage_errors`,
    `integrity_errors` and `skipped` (never raised); `entries` is the number of indexed answers.

    Example:

    ```python
    >>> import tempfile
    >>> import numpy as np
    >>> from hf_neuralcache import SemanticCache
    >>> class Letters:  # a toy embedder; the default is all-MiniLM-L6-v2
    ...     dim, fingerprint = 26, "letters"
    ...     def encode(self, texts):
    ...         v = np.array([[t.count(chr(97 + i)) + 1e-3 for i in range(26)] for t in texts], dtype=np.float32)
    ...         return v / np.linalg.norm(v, axis=1, keepdims=True)
    >>> cache = SemanticCache(tempfile.mkdtemp(), embedder=Letters(), M=8, ef=32)
    >>> cache.stats()["entries"], cache.index.M
    (0, 8)
    ```
    """

    save_every = 1000  # additions between two saves of the index (also saved on close())
    refresh_seconds = 1.0  # how often a lookup reads the records other processes added
    pending_seconds = 60.0  # how long a label handed out but not recorded yet is waited for
    initial_capacity = 1024  # room of a new index (it doubles when full)

    def __init__(
        self,
        directory,
        embedder=None,
        threshold: float | None = None,
        guard=None,
        namespace: str | None = None,
        max_entries: int = 100_000,
        disk_bytes: int = _GiB,
        ttl: float | None = None,
        sampled_answers: int = DEFAULT_SAMPLED_ANSWERS,
        cache_sampled: bool | None = None,
        cacheable: Callable[[str | None], bool] | None = None,
        tokenizer=None,
        M: int = 16,  # noqa: N803 - hnswlib's name
        ef_construction: int = 200,
        ef: int = 64,
        candidates: int = 8,
        guard_checks: int | None = None,
        secret: str | bytes | None = None,
        remote=None,
        remote_bytes: int | None = None,
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
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError(f"namespace must be a str or None, got {type(namespace).__name__}")
        if embedder is None:
            from .embedders import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        if guard is None:
            guard = default_guard(embedder)
        if guard in ("learned", "strict+learned"):
            from .equivalence import STRICT_LEARNED_THRESHOLD, EquivalenceCheck

            tokens = embedder if hasattr(embedder, "encode_tokens") else None
            if guard == "learned":
                guard = EquivalenceCheck(embedder=tokens)
            else:
                guard = EquivalenceCheck(STRICT_LEARNED_THRESHOLD, embedder=tokens, vetoes="strict")
        elif guard == "classifier":
            from .pair_classifier import PairClassifier

            guard = PairClassifier()
        elif isinstance(guard, str):
            from .guard import LookAlikeGuard

            guard = LookAlikeGuard(guard)
        self.embedder, self.guard = embedder, guard
        if not callable(getattr(self.guard, "check", None)):
            raise ValueError(
                f"guard must be a strictness name or an object with check(query, candidate), got {guard!r}"
            )
        self._summaries = callable(getattr(self.guard, "summary", None))
        self.threshold = float(threshold)
        self.namespace, self.max_entries, self.ttl = namespace, max_entries, ttl
        self.sampled_answers = sampled_answers_setting(sampled_answers, cache_sampled)
        self.tokenizer = tokenizer
        self.cacheable = cacheable or (lambda text: not is_time_dependent(text))
        self.candidates = candidates
        if guard_checks is None:
            guard_checks = getattr(self.guard, "checks_per_lookup", None)
        if guard_checks is not None and (not isinstance(guard_checks, int) or isinstance(guard_checks, bool)
                                         or guard_checks < 1):  # fmt: skip
            raise ValueError(f"guard_checks must be an int >= 1 or None, got {guard_checks!r}")
        self.guard_checks = guard_checks
        tier = remote_tier(remote, "semantic", namespace, max_bytes=remote_bytes)
        self.store = TieredStore(directory, "semantic", disk_bytes, 0, "least-recently-used", secret, remote=tier)
        self.counters = Counters(
            self.store, ("hits", "misses", "near_misses", "bypassed", "not_cacheable", "bytes_stored", "seconds_saved")
        )
        self.index = VectorIndex(self.store.directory, embedder.dim, embedder.fingerprint, M, ef_construction, ef,
                                 self.initial_capacity, secret=self.store.secret)  # fmt: skip
        self.records = LabelRecords(self.store, self.pending_seconds)
        self.log = None if tier is None else SharedLog(tier, embedder.fingerprint, namespace, 2 * max_entries,
                                                       self.store.failed)  # fmt: skip
        self._lock = threading.RLock()
        self._open()

    # ---- the records and the index ------------------------------------------------------------------------------
    def _open(self) -> None:
        """Load the saved index (if usable) and reconcile it with the records: the records are the truth."""
        with self._lock:
            self._labels: dict[int, dict] = {}  # label -> record, for the labels in the index
            self._by_key: dict[str, int] = {}
            self._added, self._checked = 0, time.monotonic()
            self.index.load()
            self._seen, pending = self.records.counter()  # before the records: later ones come by _refresh
            found = self.records.read_all()
            self._seen = max(self._seen, *found, -1)  # the counter may have been lost: never hand out a used label
            self._unrecorded = pending - set(found)  # labels handed out by others, not recorded yet
            self._register(found)
            for label in self.index.labels - set(self._labels):  # removed since the index was saved
                self.index.remove(label)
            self._catch_up()

    def _refresh(self) -> None:
        """Take in the labels other processes recorded since the last look, then (with a remote tier) the answers
        other hosts stored."""
        with self._lock:
            self._take_records()
            self._catch_up()

    def _take_records(self) -> None:
        """Take in the labels other processes recorded in this folder since the last look (and those pending then)."""
        with self._lock:
            top, pending = self.records.counter()
            todo = set(range(self._seen + 1, top + 1)) | self._unrecorded
            found = {label: record for label in sorted(todo) if (record := self.records.read(label))}
            self._unrecorded = (todo & pending) - set(found)
            self._seen, self._checked = max(self._seen, top), time.monotonic()
            self._register(found)

    def _register(self, records: dict[int, dict]) -> None:
        """Index the answers of `records` (label -> record) whose entries exist; drop the records of the others."""
        new_labels, vectors, texts = [], [], []
        for label, record in sorted(records.items()):
            if label in self._labels:
                continue
            if not isinstance(record.get("key"), str) or not self.store.local(record["key"]):
                self.records.delete(label)  # its answer is gone: evicted, expired, bad
                continue
            if label not in self.index.labels:
                entry = self.store.get(record["key"])
                if entry is None:
                    self.records.delete(label)
                    continue
                if entry.meta.get("embedder") == self.embedder.fingerprint:
                    vectors.append(entry.tensors["embedding"].numpy())
                else:  # stored by a process with another embedder: embed its text again
                    texts.append((len(vectors), record["request"]))
                    vectors.append(None)
                new_labels.append(label)
            self._labels[label] = record
            self._by_key[record["key"]] = label
        if texts:
            encoded = self.embedder.encode([text for _, text in texts])
            for (slot, _), vector in zip(texts, encoded, strict=True):
                vectors[slot] = vector
        if new_labels:
            self.index.add(new_labels, np.stack(vectors))

    def _drop(self, label: int) -> None:
        """Take `label` out of this process's index (its record is already gone or is deleted by the caller)."""
        record = self._labels.pop(label, None)
        if record is not None and self._by_key.get(record["key"]) == label:
            del self._by_key[record["key"]]
        self.index.remove(label)

    def _forget(self, label: int) -> None:
        """Delete the record of `label` (its answer is gone), then take it out of the index."""
        with self._lock:
            self.records.delete(label)
            self._drop(label)

    def _sweep(self) -> None:
        """Forget every label whose answer is gone (the byte bound or the TTL removed it, or another process did)."""
        with self._lock:
            for label, record in list(self._labels.items()):
                if not self.store.local(record["key"]):
                    self._forget(label)

    # ---- other hosts (the shared stream, see shared.py) ---------------------------------------------------------
    def _catch_up(self) -> None:
        """Apply the events other processes appended to the shared stream since the last look (with a remote tier)."""
        if self.log is None or self.store.disabled or self.store.readonly is not None:
            return
        with self._lock:
            more = True
            while more:
                found = self.log.read()
                if found is None:  # Redis failed: skipped for a while, the next refresh tries again
                    return
                events, more = found
                adds: dict[str, dict] = {}
                for event in events:
                    if event["op"] == "add":
                        if event["key"] not in self._by_key:
                            adds[event["key"]] = event
                        continue
                    self._copy(list(adds.values()))
                    adds = {}
                    self._remove_local(None if event["op"] == "clear" else event["request"])
                self._copy(list(adds.values()))
            self._evict()

    def _copy(self, events: list[dict]) -> None:
        """Fetch the answers that "add" events name, check them, and record and index each good one here."""
        if any(self.store.local(event["key"]) for event in events):  # maybe a process sharing this folder took it
            self._take_records()
            events = [event for event in events if event["key"] not in self._by_key]
        loaded = self.store.get_remote([(event["key"], event["model"]) for event in events])
        labels, vectors = [], []
        for event, entry in zip(events, loaded, strict=True):
            if entry is None:  # gone from Redis (expired, removed, evicted) or bad (counted): not taken in
                continue
            vector = self._answer_vector(entry, event["request"])
            if vector is None:
                self.store.failed("integrity", "redis answer", CorruptEntryError("an answer that is not its event's"))
                self.store.delete(event["key"], shared=False)
                continue
            if not self.store.local(event["key"]):  # the folder did not take it
                continue
            label = self.records.reserve(self._seen + 1)
            if label is None:
                return
            record = {name: event[name] for name in ("key", "context", "request", "namespace", "model")}
            self.records.commit(label, record)
            labels.append(label)
            vectors.append(vector)
            self._labels[label], self._by_key[event["key"]] = record, label
        if labels:
            self.index.add(labels, np.stack(vectors))

    def _answer_vector(self, entry, request: str) -> np.ndarray | None:
        """The stored embedding of an answer fetched from Redis when the answer is one this cache writes for
        `request` with this embedder, else `None`."""
        tokens, stored = entry.tensors.get("new_tokens"), entry.tensors.get("embedding")
        if entry.meta.get("request") != request or entry.meta.get("embedder") != self.embedder.fingerprint:
            return None
        if tokens is None or tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.dtype != torch.long:
            return None
        if stored is None or tuple(stored.shape) != (self.embedder.dim,) or stored.dtype != torch.float32:
            return None
        vector = stored.numpy()
        return vector.copy() if np.isfinite(vector).all() and abs(float(vector @ vector) - 1.0) < 1e-3 else None

    def _remove_local(self, request: str | None) -> None:
        """Take out of this host the answers of this namespace to `request` (`None`: all of them); Redis is left
        alone (the process that appended the removal removed them there)."""
        for label, record in list(self._labels.items()):
            if record.get("namespace") == self.namespace and request in (None, record["request"]):
                self._delete_answers(record["key"])
                self._forget(label)

    def save(self, wait: bool = True) -> bool:
        """Write the index to the folder (atomically); lookups do not need it, it only speeds up the next start.

        Returns whether it was written (not when the folder is read-only, the storage fails, or, with `wait=False`,
        another process is saving it right now).
        """
        if self.store.disabled or self.store.readonly is not None:
            return False
        with self._lock:
            saved = self.store.guarded("save index", self.index.save, self.store.meta, wait=wait, default=False)
            if saved:
                self._added = 0
            return bool(saved)

    # ---- requests -----------------------------------------------------------------------------------------------
    def why_not(self, request, tokenizer=None) -> str | None:
        """Why a call cannot take part (a short reason), or `None` when it can."""
        if (request.tokenizer or tokenizer or self.tokenizer) is None:
            return "no tokenizer: pass tokenizer= to generate(), attach() or SemanticCache()"
        if request.uncacheable:
            return request.uncacheable
        if request.input_ids.shape[0] != 1:
            return "a batch of several prompts"
        config = request.generation_config
        if config.do_sample and not self.sampled_answers:
            return "sampling with sampled_answers=0"
        if (config.num_return_sequences or 1) > 1:
            return "num_return_sequences > 1"
        return None

    def describe(self, model, request, tokenizer=None) -> tuple[str, str] | None:
        """`(request_text, context_key)` of a call, or `None` when it cannot take part (see the class docstring)."""
        if self.why_not(request, tokenizer) is not None:
            return None
        tokenizer = request.tokenizer or tokenizer or self.tokenizer
        config = request.generation_config
        full = tokenizer.decode(request.input_ids[0][request.attention_mask[0].bool()])
        cut = max((full.rfind(m) + len(m) for m in _CHAT_USER_MARKERS if m in full), default=0)
        turn = full[cut:]
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in turn]
        start = 0  # after the special tokens that open the turn (a BOS, "[CLS]")
        while opener := next((t for t in specials if turn[start:].lstrip().startswith(t)), None):
            start = turn.index(opener, start) + len(opener)
        end = min((i for t in specials if (i := turn.find(t, start)) >= 0), default=len(turn))
        text = turn[start:end].strip()
        if not text:
            return None
        fingerprint = model_fingerprint(model)
        self.store.use_model(fingerprint)
        context = digest(
            "semantic-context", fingerprint, self.namespace or "", config.to_dict(), request.extra,
            full[:cut], turn[:start], turn[end:],
        )  # fmt: skip
        return text, context

    # ---- lookups and stores -------------------------------------------------------------------------------------
    def get(self, model, request, tokenizer=None):
        """The stored answer for a request that means the same as this one, or `None`."""
        reason = self.why_not(request, tokenizer)
        if reason is not None:
            self.bypass(reason, warn=reason.startswith("no tokenizer"))
            return None
        described = self.describe(model, request, tokenizer)
        if described is None:
            self.bypass("no text in the last user turn")
            return None
        text, context = described
        if not self.cacheable(text):
            self.counters.add("not_cacheable", 1)
            return None
        if time.monotonic() - self._checked > self.refresh_seconds:
            self._refresh()
        with self._lock:
            if not self._labels:
                self.counters.add("misses", 1)
                return None
            vector = self.embedder.encode([text])[0]
            found = self.index.search(vector, self.candidates)
        rejected, checks = False, 0
        for label, similarity in found:
            if similarity < self.threshold or (self.guard_checks is not None and checks >= self.guard_checks):
                break
            record = self._labels.get(label)
            if record is None or record["context"] != context:
                continue
            entry = None
            if self._summaries:  # the candidate's word-piece states were stored with it: no forward pass over it
                entry = self.store.get(record["key"])
                if entry is None:
                    self._forget(label)
                    continue
                verdict = self.guard.check(text, record["request"], self._summary(entry, record), similarity)
            else:
                verdict = self.guard.check(text, record["request"])
            checks += 1
            if not verdict.ok:
                rejected = True
                continue
            key = record["key"]
            if request.generation_config.do_sample:  # one of the request's answers, once all are stored
                key = SampleSlots(self.store, key, self.sampled_answers).pick()
                if key is None:
                    break  # still collecting answers: a miss (put() fills the next slot)
                entry = None
            entry = self.store.get(key) if entry is None else entry
            if entry is None:  # evicted, expired or bad since it was indexed
                if key == record["key"]:
                    self._forget(label)
                continue
            if not self._matches(label, entry, record, vector):
                continue
            prompt = request.input_ids
            full = torch.cat([prompt, entry.tensors["new_tokens"].to(prompt.device)], dim=1)
            output = output_from_entry({**entry.tensors, "sequences": full}, entry.meta, prompt.device, full)
            if output is None:
                continue
            self.counters.add("hits", 1)
            self.counters.add("seconds_saved", entry.meta.get("seconds", 0.0))
            stream(request, output)
            return output
        self.counters.add("near_misses" if rejected else "misses", 1)
        return None

    def _summary(self, entry, record: dict):
        """The guard's summary of the record's request kept in its answer (see `EquivalenceCheck.summary`), or
        `None` when there is none usable (stored by another guard or embedder, or damaged): the guard then computes
        it again."""
        states, pieces = entry.tensors.get("equivalence_states"), entry.meta.get("equivalence_pieces")
        if entry.meta.get("request") != record["request"] or entry.meta.get("embedder") != self.embedder.fingerprint:
            return None
        if states is None or states.dtype != torch.float16 or states.dim() != 2 or states.shape[1] != self.embedder.dim:
            return None
        if not isinstance(pieces, list) or len(pieces) != states.shape[0]:
            return None
        if not all(isinstance(piece, str) for piece in pieces):
            return None
        states = states.numpy()
        norms = np.linalg.norm(states.astype(np.float32), axis=1)
        return (pieces, states) if np.isfinite(norms).all() and np.abs(norms - 1.0).max(initial=0.0) < 1e-2 else None

    def _matches(self, label: int, entry, record: dict, vector: np.ndarray) -> bool:
        """Whether `entry` answers the record's request and its stored embedding clears the threshold too."""
        same = entry.meta.get("request") == record["request"]
        tokens = entry.tensors.get("new_tokens")
        same = same and tokens is not None and tokens.dim() == 2 and tokens.shape[0] == 1 and tokens.dtype == torch.long
        stored = entry.tensors.get("embedding")
        if same and entry.meta.get("embedder") == self.embedder.fingerprint and stored is not None:
            same = stored.shape == vector.shape and float(stored.numpy() @ vector) >= self.threshold - 1e-5
        if not same:
            logger.warning("hf_neuralcache: semantic index label %d does not match its answer; dropped", label)
            with self._lock:
                self._drop(label)
        return same

    def put(self, model, request, output, seconds: float, tokenizer=None) -> None:
        """Store the answer of a call that missed (no-op for calls that cannot take part or are not cacheable)."""
        described = self.describe(model, request, tokenizer)
        if described is None:
            return
        text, context = described
        if not self.cacheable(text) or not self.store.writable("write"):
            return
        stored = entry_from_output(output)
        if stored is None:
            return
        tensors, meta = stored
        sequences = tensors.pop("sequences")
        tensors["new_tokens"] = sequences[:, request.input_ids.shape[1] :]
        key = entry_key(context, text)
        if time.monotonic() - self._checked > self.refresh_seconds:
            self._refresh()
        if key in self._by_key:  # answered already (an entry without a record is overwritten)
            if request.generation_config.do_sample:  # another answer of a sampled request, in its next slot
                slot = SampleSlots(self.store, key, self.sampled_answers).free()
                if slot is not None:
                    vector = self.embedder.encode([text])[0]
                    tensors["embedding"] = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
                    meta.update(seconds=seconds, label=self._by_key[key], request=text,
                                embedder=self.embedder.fingerprint)  # fmt: skip
                    self.counters.add("bytes_stored", self.store.put(slot, tensors, meta, expire=self.ttl))
            return
        vector = self.embedder.encode([text])[0]
        tensors["embedding"] = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        if self._summaries:  # from the embedding pass just run (the embedder's memory): no second pass
            pieces, states = self.guard.summary(text)
            tensors["equivalence_states"] = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float16))
            meta["equivalence_pieces"] = list(pieces)
        self._make_room(sum(t.numel() * t.element_size() for t in tensors.values()) + 4096)
        label = self.records.reserve(self._seen + 1)
        if label is None:  # the folder could not be written (counted by the store)
            return
        meta.update(seconds=seconds, label=label, request=text, embedder=self.embedder.fingerprint)
        written = self.store.put(key, tensors, meta, expire=self.ttl)
        record = {"key": key, "context": context, "request": text, "namespace": self.namespace,
                  "model": self.store.model}  # fmt: skip
        self.records.commit(label, record if written else None)
        if not written:
            return
        self.counters.add("bytes_stored", written)
        with self._lock:
            self.index.add([label], vector[None])
            self._labels[label], self._by_key[key] = record, label
            self._added += 1
        if self.log is not None:  # after the answer, so other hosts never read the event first
            self.log.publish("add", key=key, context=context, request=text, model=self.store.model)
        self._evict()
        if self._added >= self.save_every:
            self.save(wait=False)  # never stall a request behind another process's save

    def _evict_oldest(self) -> None:
        with self._lock:
            oldest = min(self._labels)
            self._delete_answers(self._labels[oldest]["key"])  # a local bound: the shared answer stays in Redis
            self._forget(oldest)

    def _delete_answers(self, key: str, model: str | None = None, shared: bool = False) -> None:
        """Remove the answer under `key` and the other answers of its sampled request, from this host (`shared`:
        from Redis too, under `model`'s keys)."""
        for slot in SampleSlots.all_keys(key)[: max(self.sampled_answers, 1)]:
            self.store.delete(slot, model, shared=shared)

    def _make_room(self, nbytes: int) -> None:
        """Evict the oldest answers until `nbytes` more fit the byte bound (the store's own cull drops them in tens)."""
        while self._labels and self.store.volume() + nbytes > self.store.disk_bytes:
            self._evict_oldest()

    def _evict(self) -> None:
        """Keep `max_entries`: oldest answers first; forget labels whose answers the byte bound or the TTL removed."""
        if len(self.store) < len(self._labels):
            self._sweep()
        while len(self._labels) > self.max_entries:
            self._evict_oldest()

    def delete(self, text: str) -> int:
        """Remove the answers stored for exactly this request text in this namespace (any context); returns how many
        this host held. With a remote tier they are removed from Redis too, and every host removes its own copies
        (and answers to the same text in other contexts) when it next reads the shared stream."""
        if not isinstance(text, str):
            raise ValueError(f"expected the request text as a str, got {type(text).__name__}")
        removed = 0
        with self._lock:
            self._refresh()
            for label, record in list(self._labels.items()):
                if record["request"] == text.strip() and record.get("namespace") == self.namespace:
                    model = record.get("model") if isinstance(record.get("model"), str) else None
                    self._delete_answers(record["key"], model, shared=True)
                    self._forget(label)
                    removed += 1
            if self.log is not None:
                self.log.publish("del", request=text.strip())
        return removed

    # ---- operations ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        if not self.store.disabled and self.store.readonly is None:
            self.store.guarded("expire", self.store.disk.expire, retry=True)
        if len(self.store) < len(self._labels):
            self._sweep()
        return {**super().stats(), "entries": len(self._labels)}

    def clear(self) -> None:
        """Remove every answer (all namespaces and contexts), its record and the saved index. With a remote tier,
        this namespace's answers are removed from Redis too, and every host removes its copies of them when it next
        reads the shared stream."""
        with self._lock:
            clear_folder(self.store)
            self.index.reset()
            self._labels, self._by_key, self._unrecorded = {}, {}, set()
            self._seen = self.records.counter()[0]
            if self.log is not None:
                self.log.publish("clear")

    def close(self) -> None:
        """Save the index and the statistics, and close the folder's database connections."""
        self.save()
        super().close()

    def __repr__(self):
        return f"SemanticCache({str(self.store.directory)!r}, threshold={self.threshold})"
