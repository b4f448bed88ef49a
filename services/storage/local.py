"""LocalStore: the artifact store as plain files under a root directory (the embedded default).

Writes go to a hidden temporary file beside the target, then os.replace: a reader sees the
old or the new file, never a partial one. Temporary names start with '.', which no key
segment may (keys.py), so they never collide with a key nor appear in a listing; a crash
can leave one behind, harmlessly. A full disk is StorageFull (permanent, RESOURCE_EXHAUSTED), its
temporary file removed. No fsync: atomic for readers, not durable across a power
cut (the object store is the durable backend).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError, NotFoundError, StorageFull
from . import traffic
from .base import ArtifactStore, ObjectInfo
from .keys import check_key, check_prefix

_COPY_CHUNK = 1 << 20


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@contextlib.contextmanager
def disk_full_is_permanent(what: str) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) raised inside the block becomes StorageFull: a clean, permanent
    error (RESOURCE_EXHAUSTED) instead of an OSError retried as if it were transient."""
    try:
        yield
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise StorageFull(f"disk full: {what} failed ({os.strerror(error.errno)})") from None
        raise


class LocalStore(ArtifactStore):
    """Objects as files: key "a/b/c" is the file root/a/b/c.

    A prefix can also be a link to a directory outside the store (`link_directory`): its files
    read as objects, deleting the prefix removes only the link, never the files behind it, and
    writes go through only if the link was made writable (an index a user appends to in place)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    # -- writes -------------------------------------------------------------------------

    def _write_atomically(self, key: str, write: Callable[[BinaryIO], None]) -> None:
        path = self._path(key)
        link = self._read_only_link(path)
        if link is not None:
            raise InputError(f"cannot store {key!r}: {link.relative_to(self.root)} is a read-only linked directory")
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with disk_full_is_permanent(f"storing {key!r}"):
            for attempt in range(3):
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handle = open(temporary, "xb")  # noqa: SIM115 (closed below)
                    break
                except FileNotFoundError:  # a concurrent delete just removed the emptied parent
                    if attempt == 2:
                        raise
                except (FileExistsError, NotADirectoryError):
                    raise InputError(f"cannot store {key!r}: a prefix of it is an object") from None
            try:
                with handle:
                    write(handle)
                    written = handle.tell()
                if path.is_dir():
                    raise InputError(f"cannot store {key!r}: other keys start with {key + '/'!r}")
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
        traffic.count("local", "written", written)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda handle: handle.write(data))

    def put_buffers(self, key: str, buffers: Sequence[bytes | memoryview]) -> None:
        self._write_atomically(key, lambda handle: handle.writelines(buffers))

    def put_file(self, key: str, path: str | Path) -> None:
        source = Path(path)
        if not source.is_file():
            raise NotFoundError(f"cannot upload {source}: no such file")
        with open(source, "rb") as reader:
            self._write_atomically(key, lambda handle: shutil.copyfileobj(reader, handle, _COPY_CHUNK))

    def link_directory(self, prefix: str, directory: str | Path, writable: bool = False) -> None:
        """Make the files of `directory` readable as the objects under `prefix` (ending in "/"),
        without copying them. Nothing there is ever deleted through the store, and nothing written
        unless `writable`."""
        if not prefix.endswith("/") or not check_prefix(prefix):
            raise InputError(f"a linked directory needs a prefix ending in '/', got {prefix!r}")
        source = Path(directory).absolute()
        if not source.is_dir():
            raise NotFoundError(f"cannot link {source}: no such directory")
        link = self.root / prefix.removesuffix("/")
        if link.is_symlink() and link.resolve() == source.resolve():
            return
        if link.exists() or link.is_symlink():
            raise InputError(f"cannot link {prefix!r}: objects already exist there")
        link.parent.mkdir(parents=True, exist_ok=True)
        temporary = link.with_name(f".{link.name}.{uuid.uuid4().hex}.link")
        os.symlink(source, temporary, target_is_directory=True)
        os.replace(temporary, link)
        if writable:
            (link.parent / f".{link.name}.writable").touch()

    def _read_only_link(self, path: Path) -> Path | None:
        """The read-only link `path` lies under, if any."""
        current = path.parent
        while current != self.root and self.root in current.parents:
            if current.is_symlink():
                return None if (current.parent / f".{current.name}.writable").exists() else current
            current = current.parent
        return None

    def _linked(self, path: Path) -> bool:
        """True when `path` lies inside a linked directory (below root, through a symlink)."""
        current = path.parent
        while current != self.root and self.root in current.parents:
            if current.is_symlink():
                return True
            current = current.parent
        return False

    # -- reads --------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"no object at {key!r}") from None
        traffic.count("local", "read", len(data))
        return data

    def get_file(self, key: str, path: str | Path) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            try:
                source = open(self._path(key), "rb")  # noqa: SIM115 (closed right below)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFoundError(f"no object at {key!r}") from None
            with disk_full_is_permanent(f"copying {key!r} to {target}"), source, open(temporary, "xb") as handle:
                shutil.copyfileobj(source, handle, _COPY_CHUNK)
                traffic.count("local", "read", handle.tell())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        return target

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"no object at {key!r}")
        return ObjectInfo(key, path.stat().st_size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names completely; filter the rest by string.
        directory = prefix.rpartition("/")[0]
        start = self.root / directory if directory else self.root
        keys = []
        for folder, subfolders, files in os.walk(start, followlinks=True):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            relative = Path(folder).relative_to(self.root).as_posix()
            base = "" if relative == "." else relative + "/"
            keys.extend(base + name for name in files if not name.startswith(".") and (base + name).startswith(prefix))
        return sorted(keys)

    # -- deletes ------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self._linked(path):
            return  # a linked directory's files are never deleted through the store
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            return  # "a" when only "a/..." objects exist: there is no object "a"
        self._remove_empty_parents(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        """A prefix ending in "/" is a directory here: it is renamed out of sight (readers see
        all of it or none) and removed in one tree walk, instead of a delete per object."""
        if not prefix.endswith("/") or not check_prefix(prefix):
            return super().delete_prefix(prefix)
        directory = self.root / prefix.removesuffix("/")
        if directory.is_symlink():  # a linked directory: remove the link, keep its files
            count = sum(len(files) for _, _, files in os.walk(directory, followlinks=True))
            directory.unlink()
            (directory.parent / f".{directory.name}.writable").unlink(missing_ok=True)
            self._remove_empty_parents(directory.parent)
            return count
        if self._linked(directory / "x"):
            return 0
        hidden = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.deleting")
        try:
            os.rename(directory, hidden)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        count = sum(sum(not name.startswith(".") for name in files) for folder, _, files in os.walk(hidden))
        shutil.rmtree(hidden, ignore_errors=True)
        self._remove_empty_parents(directory.parent)
        return count

    def _remove_empty_parents(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (or already gone because of a concurrent delete)
            directory = directory.parent

    def describe(self) -> str:
        return self.root.as_uri()
