"""Where a store lives: a local directory or any fsspec URL, with the few file operations the store needs.

A local store commits a shard by renaming a finished temporary directory into place (atomic on POSIX). Object
stores have no atomic directory rename, so there a shard is written under its final name and the manifest,
written last as a single object, is the commit point; the writer deletes unlisted shards before reusing a name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore


def is_local(url: str | os.PathLike) -> bool:
    """True for plain paths and file:// URLs."""
    text = os.fspath(url)
    return "://" not in text or text.startswith("file://")


class Location:
    """A store root. Paths passed to methods are relative to it, with '/' separators."""

    def __init__(self, url: str | os.PathLike):
        text = os.fspath(url)
        self.url = text
        self.local = is_local(text)
        if self.local:
            self.root = Path(text.removeprefix("file://")).expanduser().resolve()
            self.fs = None
        else:
            self.fs, self.root_path = fsspec.core.url_to_fs(text)

    def __str__(self) -> str:
        return str(self.root) if self.local else self.url

    def _full(self, rel: str) -> str:
        return str(self.root / rel) if self.local else f"{self.root_path.rstrip('/')}/{rel}" if rel else self.root_path

    def exists(self, rel: str = "") -> bool:
        return os.path.exists(self._full(rel)) if self.local else self.fs.exists(self._full(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries of a directory; empty when it does not exist."""
        if not self.exists(rel):
            return []
        if self.local:
            return sorted(os.listdir(self._full(rel)))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._full(rel), detail=False))

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self._full(rel), exist_ok=True)
        else:
            self.fs.makedirs(self._full(rel), exist_ok=True)

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            return Path(self._full(rel)).read_bytes()
        return self.fs.cat_file(self._full(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Replace a file so a reader sees either the old or the new content, never a mix."""
        if not self.local:
            self.fs.pipe_file(self._full(rel), data)
            return
        path = Path(self._full(rel))
        # Unique per host and process: workers of one build on several nodes may write the same file at once.
        tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove_tree(self, rel: str) -> None:
        if not self.exists(rel):
            return
        if self.local:
            shutil.rmtree(self._full(rel))
        else:
            self.fs.rm(self._full(rel), recursive=True)

    def remove_file(self, rel: str) -> None:
        """Delete a file; a file already gone (removed by another process) is no error."""
        try:
            if self.local:
                os.remove(self._full(rel))
            else:
                self.fs.rm_file(self._full(rel))
        except FileNotFoundError:
            pass

    def rename(self, src: str, dst: str) -> None:
        """Move a directory into place; only used on local stores, where it is atomic."""
        assert self.local
        os.replace(self._full(src), self._full(dst))

    def files(self, rel: str) -> list[str]:
        """All files below a directory, as paths relative to that directory, sorted."""
        base = self._full(rel)
        if self.local:
            out = [os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs]
            return sorted(p.replace(os.sep, "/") for p in out)
        return sorted(p[len(base.rstrip("/")) + 1:] for p in self.fs.find(base))

    def _open(self, rel: str, mode: str):
        return open(self._full(rel), mode) if self.local else self.fs.open(self._full(rel), mode)

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self._open(rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    def copy_from(self, source: Location, src: str, dst: str) -> str:
        """Copy the file `src` of another location to `dst` here, block by block; returns the SHA-256 of its bytes."""
        if self.local:
            os.makedirs(os.path.dirname(self._full(dst)), exist_ok=True)
        digest = hashlib.sha256()
        with source._open(src, "rb") as fin, self._open(dst, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 22), b""):
                digest.update(block)
                fout.write(block)
        return digest.hexdigest()

    def size(self, rel: str) -> int:
        return os.path.getsize(self._full(rel)) if self.local else self.fs.size(self._full(rel))

    def zarr_store(self, rel: str, *, read_only: bool) -> LocalStore | FsspecStore:
        """A zarr store rooted at a sub-directory."""
        if self.local:
            return LocalStore(self._full(rel), read_only=read_only)
        return FsspecStore.from_url(f"{self.url.rstrip('/')}/{rel}", read_only=read_only)

    def open_group(self, rel: str, *, mode: str) -> zarr.Group:
        return zarr.open_group(store=self.zarr_store(rel, read_only=mode == "r"), mode=mode, zarr_format=3)

    def create_exclusive(self, rel: str, data: bytes) -> None:
        """Create the file `rel` with `data`, failing when it exists (see `storage/lock.py` for fsspec URLs).

        Raises:
            FileExistsError: the file exists.
        """
        if not self.local:
            self.fs.pipe_file(self._full(rel), data, mode="create")
            return
        fd = os.open(self._full(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def temporaries(self, rel: str) -> list[str]:
        """The temporary files that interrupted `write_bytes_atomic` calls of `rel` left, as paths below the root."""
        parent, _, name = rel.rpartition("/")
        prefix = f".{name}.tmp-"
        return [f"{parent}/{entry}" if parent else entry for entry in self.listdir(parent) if entry.startswith(prefix)]
