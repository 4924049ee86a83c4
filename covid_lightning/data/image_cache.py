"""A cache of decoded, resized images (or masks) so that later epochs never decode a PNG again.

:class:`DecodedCache` is a read-only array-like: ``cache[i]`` is exactly what
:func:`~covid_lightning.data.transforms.load_image` + the pipeline's first step
(``A.Resize(S, S, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)``) give for
``paths[i]``: an (S, S, 3) uint8 RGB image, or an (S, S) uint8 {0, 1} mask. ``A.Resize`` returns an
input that is already S x S unchanged, so a pipeline fed ``cache[i]`` gives the same tensors as one fed
the decoded file, augmentation included (tested).

Layout (both storages): a gray plane ``(N, S, S)`` uint8 holding channel 0 of every image (or the mask),
plus, only for the images whose resized channels differ, their full rows ``(M, S, S, 3)``. Chest X-rays
are gray (every file of the real Kaggle sample, RGB files included, has R = G = B), so an image costs
S*S bytes, a third of RGB: 21,165 images at 224 px take 1.06 GB instead of 3.2 GB. ``cache[i]`` expands
gray to RGB with ``cv2.cvtColor`` (a few microseconds); the expansion is exact because a row is stored
gray only when its *resized* channels were verified equal.

Storage:

* ``memory``: numpy arrays filled by a thread pool. DataLoader workers started by ``fork`` (the Linux
  default) share them copy-on-write at no cost (the pages are never written); with ``spawn`` each
  worker receives a pickled copy, so prefer ``disk`` there.
* ``disk``: ``.npy`` files under ``cache_dir`` (default ``$XDG_CACHE_HOME/covid_lightning/decoded``,
  i.e. ``~/.cache/covid_lightning/decoded``), opened as read-only memmaps (the OS page cache is shared
  by every process and survives runs); see :meth:`DecodedCache.build` for names and the reuse policy.
  A pickled disk cache carries only its file paths; each worker reopens the memmap on first access.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from covid_lightning.data.hygiene import STAT_FIELDS, default_workers, stat_key
from covid_lightning.data.transforms import ImageReadError, load_image, load_mask
from covid_lightning.runtime import cache_dir

log = logging.getLogger(__name__)

Kind = Literal["image", "mask"]
Storage = Literal["memory", "disk"]

#: Bump when the decoding, the resize, the file layout or the key changes: every older cache is then rebuilt.
#: 2: files are keyed on :func:`~covid_lightning.data.hygiene.stat_key` (size, mtime, ctime, inode).
CACHE_VERSION = 2
#: Temp files of builds that died (killed, power loss) are deleted by later builds after this long.
STALE_TEMP_SECONDS = 3600.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/covid_lightning/decoded`` (``~/.cache/covid_lightning/decoded`` by default)."""
    return cache_dir("decoded")


def resize_like_pipeline(array: np.ndarray, image_size: int, interpolation: int) -> np.ndarray:
    """What albumentations 2.0.8's ``A.Resize(S, S)`` does: the input itself when already S x S, else cv2.resize."""
    if array.shape[:2] == (image_size, image_size):
        return array
    return cv2.resize(array, (image_size, image_size), interpolation=interpolation)


def decode_resized(path: Path, image_size: int, kind: Kind) -> np.ndarray:
    """Decode one file as the pipeline does and resize it: (S, S, 3) RGB image or (S, S) {0, 1} mask."""
    if kind == "image":
        array, interpolation = load_image(path), cv2.INTER_LINEAR
    else:
        array, interpolation = load_mask(path), cv2.INTER_NEAREST
    try:
        return resize_like_pipeline(array, image_size, interpolation)
    except cv2.error as err:
        raise ImageReadError(
            f"Cannot resize {kind} {path} ({array.shape}): {err}. Remove or replace the file."
        ) from err


def cache_key(paths: Sequence[Path], image_size: int, kind: Kind) -> tuple[str, str]:
    """``(key, list_id)``: ``key`` hashes (kind, size, version, every file's absolute path and
    :func:`~covid_lightning.data.hygiene.stat_key` fields: size, mtime_ns, ctime_ns, inode) in order, so a
    same-size rewrite whose mtime was put back still changes it; ``list_id`` hashes (kind, size, the absolute
    paths) only: the caches of one file list."""
    content = hashlib.sha256(f"covid_lightning.decoded\0{kind}\0{image_size}\0{CACHE_VERSION}\0".encode())
    listing = hashlib.sha256(f"{kind}\0{image_size}\0".encode())
    for path in paths:
        key = stat_key(path)
        if key is None:
            raise ImageReadError(
                f"Cannot read {kind} {path}: it is missing or cannot be accessed (os.stat failed). "
                "Remove or replace the file."
            )
        absolute, fields = key
        name = absolute.encode("utf-8", "surrogateescape") + b"\0"
        content.update(name + "".join(f"{fields[f]}\0" for f in STAT_FIELDS).encode())
        listing.update(name)
    return content.hexdigest(), listing.hexdigest()


def _fill(gray: np.ndarray, paths: Sequence[Path], image_size: int, kind: Kind, workers: int) -> dict[int, np.ndarray]:
    """Decode ``paths`` into ``gray`` (N, S, S) with ``workers`` threads; return the rows that are not gray.

    Threads take the next index from a shared counter; the first error stops every thread after its
    current file and is raised.
    """
    n = len(paths)
    color: dict[int, np.ndarray] = {}
    lock, stop = threading.Lock(), threading.Event()
    counter = iter(range(n))

    def one(i: int) -> None:
        array = decode_resized(paths[i], image_size, kind)  # looked up at call time (tests patch it)
        first = array[..., 0] if array.ndim == 3 else array
        if array.ndim == 3 and not (np.array_equal(array[..., 1], first) and np.array_equal(array[..., 2], first)):
            color[i] = np.ascontiguousarray(array)
        gray[i] = first

    def run() -> None:
        while not stop.is_set():
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                one(i)
            except BaseException:
                stop.set()
                raise

    workers = max(1, min(workers, n))
    if workers == 1:
        run()
        return color
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decoded-cache")
    try:
        futures = [pool.submit(run) for _ in range(workers)]
        for future in futures:
            future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True)
    return color


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class DecodedCache:
    """A read-only array-like of pre-resized images or masks; build it with :meth:`build`.

    ``cache[i]`` returns a new writable array: (S, S, 3) uint8 RGB for ``kind="image"``, (S, S) uint8
    {0, 1} for ``kind="mask"``. ``key`` identifies the content (see :func:`cache_key`); ``path`` is the
    gray-plane ``.npy`` file of a disk cache (None in memory).
    """

    def __init__(
        self,
        *,
        key: str,
        kind: Kind,
        image_size: int,
        count: int,
        gray: np.ndarray | None,
        color: np.ndarray | None = None,
        color_index: Sequence[int] = (),
        path: Path | None = None,
        color_path: Path | None = None,
    ) -> None:
        self.key = key
        self.kind = kind
        self.image_size = image_size
        self.path = path
        self.color_path = color_path
        self._count = count
        self._gray = gray
        self._color = color
        self._color_index = [int(i) for i in color_index]
        self._slot: np.ndarray | None = None
        if self._color_index:
            self._slot = np.full(count, -1, dtype=np.int32)
            self._slot[self._color_index] = np.arange(len(self._color_index), dtype=np.int32)

    # building --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        paths: Sequence[Path],
        image_size: int,
        *,
        kind: Kind = "image",
        storage: Storage = "memory",
        cache_dir: Path | None = None,
        workers: int | None = None,
    ) -> DecodedCache:
        """Decode and resize every file of ``paths`` (in this order) with ``workers`` threads (default: cores).

        ``storage="disk"`` writes ``<kind><S>-<list_id[:16]>-<key[:16]>.npy`` (gray plane), ``.color.npy``
        (only when some image is not gray) and ``.json`` (a small sidecar: key, shape, the indices of
        the color rows) to ``cache_dir``. A later build whose key matches opens them read-only (no
        decoding: a stat of every file plus a memmap); a changed, added, removed or reordered file gives
        another key, hence a rebuild. Files are written under temporary names and renamed, the gray
        plane last, so an interrupted build is never reused. After a build, the caches of the same
        file list (same kind, size and paths) with another key are deleted, as are temp files of dead
        builds older than an hour; other sizes and file lists are kept (delete ``cache_dir`` to reclaim
        space). A process that still maps a deleted file keeps reading it; a spawned worker reopening it
        by path fails with a clear error. An unreadable file raises
        :class:`~covid_lightning.data.transforms.ImageReadError` naming it.
        """
        if kind not in ("image", "mask"):
            raise ValueError(f"kind must be 'image' or 'mask', not {kind!r}")
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', not {storage!r}")
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, not {image_size!r}")
        image_size = int(image_size)
        paths = [Path(p) for p in paths]
        n_workers = default_workers() if workers is None else max(1, int(workers))
        key, list_id = cache_key(paths, image_size, kind)
        if storage == "memory" or not paths:
            gray = np.empty((len(paths), image_size, image_size), dtype=np.uint8)
            start = time.perf_counter()
            color = _fill(gray, paths, image_size, kind, n_workers)
            gray.flags.writeable = False
            index = sorted(color)
            rows = np.stack([color[i] for i in index]) if index else None
            if rows is not None:
                rows.flags.writeable = False
            cache = cls(
                key=key, kind=kind, image_size=image_size, count=len(paths), gray=gray, color=rows, color_index=index
            )
            if paths:
                seconds = time.perf_counter() - start
                log.info("Decoded %d %ss at %d px into memory in %.1f s.", len(paths), kind, image_size, seconds)
            return cache
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        prefix = f"{kind}{image_size}-{list_id[:16]}-"
        stem = prefix + key[:16]
        cache = cls._open_disk(directory, stem, key, kind, image_size, len(paths))
        if cache is not None:
            log.info("Reusing the decoded %s cache %s (%d files).", kind, cache.path, len(paths))
            return cache
        cls._write_disk(directory, stem, key, kind, image_size, paths, n_workers)
        cls._prune(directory, prefix, stem)
        cache = cls._open_disk(directory, stem, key, kind, image_size, len(paths))
        if cache is None:  # only if another process deleted it in between
            raise RuntimeError(f"The decoded cache {directory / stem}.npy vanished right after it was written.")
        return cache

    @classmethod
    def _write_disk(
        cls, directory: Path, stem: str, key: str, kind: Kind, image_size: int, paths: list[Path], workers: int
    ) -> None:
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final = {ext: directory / f"{stem}{ext}" for ext in (".npy", ".color.npy", ".json")}
        temp = {ext: directory / f".{stem}{ext}.{token}.tmp" for ext in final}
        shape = (len(paths), image_size, image_size)
        log.info("Decoding %d %ss at %d px into %s ...", len(paths), kind, image_size, final[".npy"])
        start = time.perf_counter()
        try:
            gray = np.lib.format.open_memmap(temp[".npy"], mode="w+", dtype=np.uint8, shape=shape)
            color = _fill(gray, paths, image_size, kind, workers)
            gray.flush()
            del gray
            index = sorted(color)
            if index:
                with open(temp[".color.npy"], "wb") as f:
                    np.save(f, np.stack([color[i] for i in index]))
            sidecar = {
                "version": CACHE_VERSION,
                "key": key,
                "kind": kind,
                "image_size": image_size,
                "count": len(paths),
                "first_path": os.path.abspath(paths[0]),
                "color_index": index,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            temp[".json"].write_text(json.dumps(sidecar) + "\n", encoding="utf-8")
            if index:
                os.replace(temp[".color.npy"], final[".color.npy"])
            os.replace(temp[".json"], final[".json"])
            os.replace(temp[".npy"], final[".npy"])  # the commit: a build is complete once this name exists
        except BaseException:
            for path in temp.values():
                _unlink(path)
            raise
        seconds = time.perf_counter() - start
        log.info("Decoded %d %ss in %.1f s (%d not gray).", len(paths), kind, seconds, len(index))

    @classmethod
    def _open_disk(
        cls, directory: Path, stem: str, key: str, kind: Kind, image_size: int, count: int
    ) -> DecodedCache | None:
        """The complete cache ``stem`` when it matches ``key`` and its shapes, else None."""
        path, color_path, sidecar = (directory / f"{stem}{ext}" for ext in (".npy", ".color.npy", ".json"))
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            index = [int(i) for i in meta["color_index"]]
            found = (meta["version"], meta["key"], meta["kind"], meta["image_size"], meta["count"])
            if found != (CACHE_VERSION, key, kind, image_size, count):
                return None
            gray = np.load(path, mmap_mode="r")
            if gray.shape != (count, image_size, image_size) or gray.dtype != np.uint8:
                return None
            color = None
            if index:
                color = np.load(color_path, mmap_mode="r")
                if color.shape != (len(index), image_size, image_size, 3) or color.dtype != np.uint8:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(
            key=key,
            kind=kind,
            image_size=image_size,
            count=count,
            gray=gray,
            color=color,
            color_index=index,
            path=path,
            color_path=color_path if index else None,
        )

    @staticmethod
    def _prune(directory: Path, prefix: str, stem: str) -> None:
        """Delete the other-key caches of this file list and temp files of dead builds."""
        now = time.time()
        for path in directory.glob(prefix + "*"):
            if not path.name.startswith(stem + "."):
                log.info("Deleting the outdated decoded cache file %s.", path)
                _unlink(path)
        for path in directory.glob(f".{prefix}*.tmp"):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    _unlink(path)
            except OSError:
                pass

    # reading ---------------------------------------------------------------------------------
    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._gray is None:  # a disk cache unpickled in a worker: reopen by path
            assert self.path is not None
            try:
                self._gray = np.load(self.path, mmap_mode="r")
                if self.color_path is not None:
                    self._color = np.load(self.color_path, mmap_mode="r")
            except OSError as err:
                raise RuntimeError(
                    f"The decoded cache {self.path} is gone (rebuilt by another run for changed files?): {err}. "
                    "Build the cache again."
                ) from err
        return self._gray, self._color

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"index {i} out of range for a DecodedCache of {self._count} {self.kind}s")
        gray, color = self._arrays()
        if self.kind == "mask":
            return np.array(gray[i])
        if self._slot is not None and self._slot[i] >= 0:
            assert color is not None
            return np.array(color[self._slot[i]])
        return cv2.cvtColor(np.ascontiguousarray(gray[i]), cv2.COLOR_GRAY2RGB)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape: (N, S, S, 3) for images, (N, S, S) for masks."""
        s = self.image_size
        return (self._count, s, s, 3) if self.kind == "image" else (self._count, s, s)

    @property
    def storage(self) -> Storage:
        return "disk" if self.path is not None else "memory"

    @property
    def nbytes(self) -> int:
        """Bytes held: the gray plane plus the color rows (a third of RGB when every image is gray)."""
        s = self.image_size
        return self._count * s * s + len(self._color_index) * s * s * 3

    @property
    def color_count(self) -> int:
        """How many images are stored in full RGB (their resized channels differ)."""
        return len(self._color_index)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path is not None:  # never pickle the pixels of a disk cache: workers reopen the memmap
            state["_gray"] = state["_color"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (
            f"DecodedCache(kind={self.kind!r}, n={self._count}, image_size={self.image_size}, "
            f"storage={self.storage!r}, key={self.key[:16]!r}{where})"
        )
