"""The semantic cache's nearest-neighbour index: hnswlib (cosine space) in memory, saved atomically with a checksum.

Two files in the cache folder:

- `index.bin`: hnswlib's own binary format (`save_index` writes the graph links and the float32 vectors as raw
  arrays; it is not pickle, and `load_index` runs no code from the file). It is loaded only after its xxh3-128
  checksum matches the one recorded in `index.json`.
- `index.json`: that checksum and what the index was built with (embedder fingerprint, dimension, `M`,
  `ef_construction`) and its capacity. An index that differs in any of these is not loaded (the cache rebuilds it
  from its stored answers and logs why).

Both files are written to temporary names and renamed, under a lock shared by the processes of the folder, so a
crash or a concurrent save leaves either the old pair or the new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import diskcache
import hnswlib
import numpy as np
import xxhash

logger = logging.getLogger("hf_neuralcache.semantic")

__all__ = ["VectorIndex"]

INDEX_FILES = ("index.bin", "index.json")


@contextlib.contextmanager
def _folder_lock(cache: diskcache.Cache, name: str, expire: float = 120.0):
    """A lock shared by every process of the folder (a key added atomically; it expires if its holder died)."""
    while not cache.add(name, os.getpid(), expire=expire, retry=True):
        time.sleep(0.005)
    try:
        yield
    finally:
        cache.delete(name, retry=True)


class VectorIndex:
    """Label -> unit vector, searched by cosine similarity; `labels` holds the labels added and not removed.

    Args:
        directory (`Path`): Folder of `index.bin` and `index.json`.
        dim (`int`): Length of the vectors.
        embedder (`str`): Fingerprint of the embedder that made them.
        M (`int`), ef_construction (`int`), ef (`int`): hnswlib's graph degree, build breadth and search breadth.
        capacity (`int`, *optional*, defaults to 1024): Initial room; doubled whenever it is full.
    """

    def __init__(self, directory: Path, dim: int, embedder: str, M: int, ef_construction: int, ef: int,  # noqa: N803
                 capacity: int = 1024):  # fmt: skip
        self.directory, self.dim, self.embedder = Path(directory), dim, embedder
        self.M, self.ef_construction, self.ef, self.capacity = M, ef_construction, ef, max(int(capacity), 1)
        self.reset()

    def reset(self) -> None:
        """Start empty (the files are left alone)."""
        self.index = hnswlib.Index(space="cosine", dim=self.dim)
        self.index.init_index(max_elements=self.capacity, M=self.M, ef_construction=self.ef_construction)
        self.index.set_ef(self.ef)
        self.labels: set[int] = set()

    def _info(self) -> dict:
        return {"embedder": self.embedder, "dim": self.dim, "M": self.M, "ef_construction": self.ef_construction}

    def load(self) -> bool:
        """Replace the contents with the saved index; `False` (and empty) when there is none or it is unusable."""
        try:
            info = json.loads((self.directory / "index.json").read_text())
            path = self.directory / "index.bin"
            data = path.read_bytes()
            built = {name: info.get(name) for name in self._info()}
            if built != self._info():
                raise ValueError(f"built with {built}, expected {self._info()}")
            if xxhash.xxh3_128_hexdigest(data) != info["checksum"]:
                raise ValueError("checksum mismatch")
            index = hnswlib.Index(space="cosine", dim=self.dim)
            index.load_index(str(path), max_elements=max(int(info["capacity"]), self.capacity))
            index.set_ef(self.ef)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            logger.warning("hf_neuralcache: semantic index in %s unusable (%s); rebuilding it", self.directory, err)
            self.reset()
            return False
        self.index, self.labels = index, set(index.get_ids_list())  # may include labels marked deleted
        return True

    def add(self, labels: list[int], vectors: np.ndarray) -> None:
        """Add `vectors` `[N, dim]` under `labels`, growing the index as needed."""
        if not labels:
            return
        needed = self.index.get_current_count() + len(labels)
        if needed > self.index.get_max_elements():
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
        self.index.add_items(np.asarray(vectors, dtype=np.float32).reshape(len(labels), self.dim), np.array(labels))
        self.labels.update(labels)

    def remove(self, label: int) -> None:
        """Mark `label` deleted (no-op when it is not in the index)."""
        if label in self.labels:
            self.labels.discard(label)
            try:
                self.index.mark_deleted(label)
            except RuntimeError:  # marked deleted in the saved index already
                pass

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The up to `k` nearest labels and their cosine similarities, most similar first."""
        k = min(k, len(self.labels))
        while k > 0:
            try:
                labels, distances = self.index.knn_query(vector.reshape(1, -1).astype(np.float32), k=k)
                return [(int(a), 1.0 - float(d)) for a, d in zip(labels[0], distances[0], strict=True)]
            except RuntimeError:  # fewer than k reachable (deleted elements cut the graph): ask for fewer
                k //= 2
        return []

    def save(self, lock_cache: diskcache.Cache) -> None:
        """Write `index.bin` and `index.json` atomically, one process at a time (`lock_cache` holds the lock)."""
        tmp = self.directory / f".index.{os.getpid()}.tmp"
        info_tmp = self.directory / f".index.{os.getpid()}.json.tmp"
        with _folder_lock(lock_cache, "semantic-index-save"):
            self.index.save_index(str(tmp))
            info = {**self._info(), "checksum": xxhash.xxh3_128_hexdigest(tmp.read_bytes()),
                    "capacity": self.index.get_max_elements()}  # fmt: skip
            info_tmp.write_text(json.dumps(info))
            os.replace(tmp, self.directory / "index.bin")
            os.replace(info_tmp, self.directory / "index.json")

    def delete_files(self) -> None:
        for name in INDEX_FILES:
            (self.directory / name).unlink(missing_ok=True)
