"""The file caches' one mechanism, and :class:`DecodedCache`: decoded, resized images, decoded once."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from covid_lightning import runtime
from covid_lightning.data.transforms import ImageReadError, load_image, load_mask

log = logging.getLogger(__name__)

Kind = Literal["image", "mask"]
Storage = Literal["memory", "disk"]

#: Bump when what a cache stores (decoding, resize, layout, key) changes: older entries are then ignored.
CACHE_VERSION = 3
#: Temp files of builds that died (killed, power loss) are deleted by later builds after this long.
STALE_TEMP_SECONDS = 3600.0


def stat_key(path: str | Path) -> tuple[str, str] | None:
    """``(absolute path, "size mtime_ns ctime_ns inode")``, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name next to ``path``, renamed to it when the block succeeds (never half a file), else removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def thread_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int | None = None) -> list[Any]:
    """``fn`` over ``items`` in order, in ``workers`` threads (default: usable CPUs); an error cancels the rest."""
    workers = min(runtime.usable_cpus() if workers is None else workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(cancel_futures=True)


def decode_resized(path: Path, image_size: int, kind: Kind) -> np.ndarray:
    """One file as the pipeline's first step (``A.Resize``) gives it: (S, S, 3) RGB or an (S, S) {0, 1} mask."""
    array = load_image(path) if kind == "image" else load_mask(path)
    if array.shape[:2] == (image_size, image_size):
        return array
    interpolation = cv2.INTER_LINEAR if kind == "image" else cv2.INTER_NEAREST
    return cv2.resize(array, (image_size, image_size), interpolation=interpolation)


def cache_key(paths: Sequence[Path], image_size: int, kind: Kind) -> tuple[str, str]:
    """``(key, list_id)``: ``key`` hashes every file's :func:`stat_key` too; ``list_id`` the paths only."""
    stats = [stat_key(p) for p in paths]
    if None in stats:
        raise ImageReadError(f"Cannot read {kind} {paths[stats.index(None)]}: missing or not accessible. Replace it.")
    digest = lambda *parts: hashlib.sha256(repr(parts).encode("utf-8", "surrogateescape")).hexdigest()  # noqa: E731
    return digest(CACHE_VERSION, kind, image_size, stats), digest(kind, image_size, [s[0] for s in stats])  # type: ignore[index]


def _decode_all(
    paths: Sequence[Path], size: int, kind: Kind, workers: int, alloc: Callable[[tuple[int, ...]], np.ndarray]
) -> np.ndarray:
    """Every file decoded and resized into ``alloc(shape)``: (N, S, S) when all are gray, else (N, S, S, 3)."""

    def fill(out: np.ndarray) -> bool:
        def one(i: int) -> bool:
            array = decode_resized(paths[i], size, kind)  # looked up at call time (tests patch it)
            out[i] = array if out.ndim == array.ndim + 1 else array[..., 0]
            return array.ndim == 2 or bool((array == array[..., :1]).all())

        return all(thread_map(one, range(len(paths)), workers))

    plane = alloc((len(paths), size, size))
    if fill(plane) or kind == "mask":
        return plane
    del plane
    log.info("Some %ss are not gray: keeping full RGB rows.", kind)
    rgb = alloc((len(paths), size, size, 3))
    fill(rgb)
    return rgb


@dataclass(eq=False)
class DecodedCache:
    """A read-only array-like of decoded, resized images or masks, in ``memory`` or on ``disk`` (a memmap)."""

    kind: Kind
    image_size: int
    key: str
    count: int
    array: Any = None
    path: Path | None = None

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
        """Decode and resize ``paths`` in threads; ``disk`` writes (or reuses) a ``.npy`` under ``cache_dir``."""
        if kind not in ("image", "mask") or storage not in ("memory", "disk"):
            raise ValueError(f"kind must be image or mask ({kind!r}), storage memory or disk ({storage!r})")
        paths, start = [Path(p) for p in paths], time.perf_counter()
        workers = runtime.usable_cpus() if workers is None else workers
        (key, list_id), n = cache_key(paths, image_size, kind), len(paths)
        if storage == "memory" or not paths:
            array = _decode_all(paths, image_size, kind, workers, lambda shape: np.empty(shape, np.uint8))
            array.flags.writeable = False
            log.info("Decoded %d %ss at %d px in %.1f s.", n, kind, image_size, time.perf_counter() - start)
            return cls(kind, image_size, key, n, array)
        directory = Path(cache_dir).expanduser() if cache_dir is not None else runtime.cache_dir("decoded")
        prefix = f"{kind}{image_size}-{list_id[:16]}-"
        path = directory / f"{prefix}{key[:16]}.npy"
        if not path.exists():
            log.info("Decoding %d %ss at %d px into %s ...", n, kind, image_size, path)
            with atomic_path(path) as tmp:
                alloc = partial(np.lib.format.open_memmap, tmp, mode="w+", dtype=np.uint8)
                _decode_all(paths, image_size, kind, workers, lambda shape: alloc(shape=shape)).flush()
            dead = time.time() - STALE_TEMP_SECONDS
            stale = [p for p in directory.glob(f"{prefix}*") if p != path]  # this file list, other contents
            stale += [p for p in directory.glob(f".{prefix}*.tmp") if p.stat().st_mtime < dead]  # dead builds
            for old in stale:
                old.unlink(missing_ok=True)
            log.info("Decoded %d %ss in %.1f s.", n, kind, time.perf_counter() - start)
        return cls(kind, image_size, key, n, path=path)

    def _array(self) -> np.ndarray:
        if self.array is None:  # a disk cache, new or unpickled in a worker: open by path
            try:
                self.array = np.load(self.path, mmap_mode="r")
            except OSError as err:
                raise RuntimeError(f"The decoded cache {self.path} is gone ({err}): build the cache again.") from err
        return self.array

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        row = np.asarray(self._array()[i])
        return cv2.cvtColor(row, cv2.COLOR_GRAY2RGB) if self.kind == "image" and row.ndim == 2 else np.array(row)

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.image_size
        return (self.count, s, s, 3) if self.kind == "image" else (self.count, s, s)

    @property
    def storage(self) -> Storage:
        return "disk" if self.path is not None else "memory"

    @property
    def nbytes(self) -> int:
        """N x S x S bytes when every image is gray, three times that otherwise."""
        return self._array().nbytes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "array": None} if self.path is not None else self.__dict__  # workers reopen
