"""The local disk tier's databases, opened so that nothing a folder holds can hurt the process or anything outside it.

A cache folder holds diskcache databases (`entries/`, `meta/`: SQLite plus value files). Whoever can write the folder
can put anything there, so:

- [`SafeDisk`] never unpickles (a pickled row raises [`UnsafeEntryError`]) and reads or removes a value file only when
  its stored name has diskcache's own form (`ab/cd/<28 hex>.val`), walking the folder one component at a time without
  following links, and only a regular file, read up to its size and at most `max_read` bytes: a row naming
  `/etc/passwd`, `../x`, a link to a FIFO or to `/dev/zero` is an [`CorruptEntryError`], never an open, a hang or a
  deletion outside the folder.
- [`open_database`] opens a database read-write when it can, read-only ([`ReadOnlyCache`]) when the folder or the
  file cannot be written (another user's folder, a read-only mount, a full disk), and moves a database aside only
  when SQLite itself reports it corrupt (`SQLITE_CORRUPT`, `SQLITE_NOTADB`, or a failed `PRAGMA quick_check`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import sqlite3
import stat
import time
from pathlib import Path
from urllib.parse import quote

import diskcache

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = [
    "CorruptEntryError",
    "ReadOnlyCache",
    "SafeDisk",
    "UnsafeEntryError",
    "is_corruption",
    "open_database",
    "read_regular_file",
]

_VALUE_NAME = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_READ_ONLY_CODES = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
                    sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH}  # fmt: skip


class UnsafeEntryError(ValueError):
    """A row of the cache database holds a pickled key or value, which hf_neuralcache never loads."""


class CorruptEntryError(ValueError):
    """An entry or a file of the folder failed its checks (magic, version, checksum, MAC, format, size, key)."""


def is_corruption(err: BaseException) -> bool:
    """Whether a database error means the data is damaged (rather than the storage being unwritable or busy)."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPT_CODES
    text = str(err).lower()  # errors the sqlite3 module raises itself carry no code (e.g. invalid UTF-8 in TEXT)
    return "malformed" in text or "not a database" in text or "could not decode" in text


def _open_inside(directory: str, parts: list[str], flags: int) -> int:
    """Open `directory/parts...` without following any link on the way; returns the file descriptor."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _read_fd(fd: int, limit: int, what: str) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise CorruptEntryError(f"{what} is not a regular file")
    if info.st_size > limit:
        raise CorruptEntryError(f"{what} holds {info.st_size} bytes, more than the {limit} allowed")
    chunks, left = [], info.st_size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if left:
        raise CorruptEntryError(f"{what} changed while it was read")
    return b"".join(chunks)


def read_regular_file(path, limit: int) -> bytes:
    """The bytes of `path` if it is a regular file (not a link, FIFO or device) of at most `limit` bytes.

    Raises:
        `FileNotFoundError`: when there is no such file; `CorruptEntryError`: when it is not a regular file or too
        large; `OSError`: when it cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CorruptEntryError(f"{path} is a symbolic link") from None
        raise
    try:
        return _read_fd(fd, limit, str(path))
    finally:
        os.close(fd)


class SafeDisk(diskcache.Disk):
    """A diskcache `Disk` that stores plain SQLite/file data only, never unpickles, and confines file access to the
    folder (see the module docstring)."""

    _PLAIN = (bytes, str, int, float)
    max_read = 1 << 40  # the owning store lowers it to its byte bound

    def put(self, key):
        if type(key) not in self._PLAIN:
            raise TypeError(f"hf_neuralcache stores keys as str or bytes, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise UnsafeEntryError("refusing to unpickle a cache key")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read or type(value) not in self._PLAIN:
            raise TypeError(f"hf_neuralcache stores values as bytes, str or numbers, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def _parts(self, filename) -> list[str]:
        if not isinstance(filename, str) or not _VALUE_NAME.fullmatch(filename):
            raise CorruptEntryError(f"value file name {str(filename)[:80]!r} is not one diskcache writes")
        return filename.split("/")

    def _open_value(self, filename) -> int:
        try:
            return _open_inside(self._directory, self._parts(filename), os.O_RDONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptEntryError(f"value file {filename} is behind a link") from None
            raise  # missing (removed by another process): diskcache treats it as a miss

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            raise UnsafeEntryError("refusing to unpickle a cache value")
        if mode == diskcache.core.MODE_RAW:
            return bytes(value) if isinstance(value, bytes | memoryview) else value
        if mode not in (diskcache.core.MODE_BINARY, diskcache.core.MODE_TEXT):
            raise CorruptEntryError(f"unknown value mode {mode!r}")
        fd = self._open_value(filename)
        try:
            data = _read_fd(fd, self.max_read, f"value file {filename}")
        finally:
            os.close(fd)
        if mode == diskcache.core.MODE_TEXT:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorruptEntryError(f"value file {filename} is not UTF-8 text") from err
        return io.BytesIO(data) if read else data

    def remove(self, file_path):
        try:
            parts = self._parts(file_path)
        except CorruptEntryError:
            logger.warning("hf_neuralcache: not removing %r: not a value file of %s", file_path, self._directory)
            return
        with contextlib.suppress(OSError):  # removed by another process already
            fd = _open_inside(self._directory, parts[:-1] + ["."], os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.unlink(parts[-1], dir_fd=fd)
            finally:
                os.close(fd)
        for depth in (2, 1):  # prune the two levels of empty sub-folders diskcache made, nothing above them
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self._directory, *parts[:depth]))


class ReadOnlyCache:
    """The read side of a diskcache database that this process cannot write (SQLite opened with `mode=ro`).

    It answers what the stores read (`get`, `in`, `len`, iteration, `volume`); it takes no lock and updates no access
    time, so eviction order is left as the writers made it.
    """

    readonly = True

    def __init__(self, directory: str, disk: SafeDisk):
        self.directory, self.disk = directory, disk
        path = quote(os.path.join(directory, diskcache.core.DBNAME))
        try:
            self._con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self._con.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
        except sqlite3.OperationalError:  # a WAL database whose -shm cannot be made: read it as immutable
            self._con = sqlite3.connect(f"file:{path}?immutable=1", uri=True, check_same_thread=False)
        self._con.text_factory = bytes  # invalid UTF-8 in a TEXT cell must not raise before our checks
        settings = dict(self._con.execute("SELECT key, value FROM Settings").fetchall())
        self.size_limit = int(settings.get(b"size_limit", settings.get("size_limit", 1 << 62)))
        self.eviction_policy = settings.get(b"eviction_policy", b"none")
        if isinstance(self.eviction_policy, bytes):
            self.eviction_policy = self.eviction_policy.decode(errors="replace")

    def get(self, key, default=None, read=False, expire_time=False, retry=False):
        db_key, raw = self.disk.put(key)
        rows = self._con.execute(
            "SELECT expire_time, mode, filename, value FROM Cache WHERE key = ? AND raw = ?"
            " AND (expire_time IS NULL OR expire_time > ?)",
            (db_key, raw, time.time()),
        ).fetchall()
        if not rows:
            return (default, None) if expire_time else default
        expire, mode, filename, value = rows[0]
        if isinstance(filename, bytes):
            filename = filename.decode("ascii", errors="replace")
        try:
            result = self.disk.fetch(mode, filename, value, read)
        except FileNotFoundError:
            return (default, None) if expire_time else default
        return (result, expire) if expire_time else result

    def __contains__(self, key) -> bool:
        db_key, raw = self.disk.put(key)
        row = self._con.execute(
            "SELECT 1 FROM Cache WHERE key = ? AND raw = ? AND (expire_time IS NULL OR expire_time > ?)",
            (db_key, raw, time.time()),
        ).fetchone()
        return row is not None

    def __len__(self) -> int:
        return self._con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0]

    def iterkeys(self):
        for key, raw in self._con.execute("SELECT key, raw FROM Cache ORDER BY rowid").fetchall():
            if isinstance(key, bytes) and raw:
                key = key.decode("utf-8", errors="replace")
            yield self.disk.get(key, raw)

    __iter__ = iterkeys

    def volume(self) -> int:
        pages = self._con.execute("PRAGMA page_count").fetchone()[0]
        page = self._con.execute("PRAGMA page_size").fetchone()[0]
        size = self._con.execute("SELECT value FROM Settings WHERE key = 'size'").fetchone()
        return pages * page + int(size[0] if size else 0)

    def expire(self, now=None, retry=False) -> int:
        return 0

    def close(self) -> None:
        self._con.close()


def _check(cache: diskcache.Cache) -> None:
    """Read the whole database structure once (`PRAGMA quick_check`): a damaged file fails here, not mid-request."""
    ((result,),) = cache._sql("PRAGMA quick_check(1)").fetchall()
    if result != "ok":
        raise sqlite3.DatabaseError(f"database disk image is malformed ({result})")


def open_database(path: Path, max_read: int, **settings):
    """Open the diskcache database at `path`: read-write, else read-only, moving it aside only when it is corrupt.

    Returns:
        `(database, reason)`: a `diskcache.Cache`, a [`ReadOnlyCache`] with the reason it is read-only, or `None`
        with the reason the folder cannot be used at all.
    """

    def disk_class():
        return type("BoundedSafeDisk", (SafeDisk,), {"max_read": max_read})

    try:
        try:
            cache = diskcache.Cache(str(path), disk=disk_class(), **settings)
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            # diskcache reads its Settings table at open and trusts it: a damaged row (a NULL or BLOB key, a value of
            # the wrong type, invalid UTF-8 in SQLite's own error text) is damage, not a bug to raise
            raise sqlite3.DatabaseError(f"database settings are malformed ({type(err).__name__}: {err})") from None
        try:
            _check(cache)
        except BaseException:
            cache.close()
            raise
        return cache, None
    except sqlite3.DatabaseError as err:
        if is_corruption(err) and os.access(path.parent, os.W_OK):
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}-{os.getpid()}")
            logger.warning("hf_neuralcache: %s is unreadable (%s); moved to %s, starting empty", path, err, aside)
            try:
                os.replace(path, aside)
                return diskcache.Cache(str(path), disk=disk_class(), **settings), None
            except (OSError, sqlite3.Error, diskcache.Timeout) as again:
                return None, f"{path} could not be replaced ({again})"
        reason = f"{path} cannot be written ({err})"
    except (OSError, diskcache.Timeout) as err:
        reason = f"{path} cannot be written ({err})"
    try:
        return ReadOnlyCache(str(path), disk_class()(str(path))), reason
    except (OSError, sqlite3.Error, ValueError, TypeError) as err:
        return None, f"{path} cannot be read either ({err})"
