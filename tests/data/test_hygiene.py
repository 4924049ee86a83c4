"""Dataset hygiene: bad files, odd masks, unpaired files, duplicates, the check-data report and command."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_lightning.data import hygiene
from covid_lightning.data.hygiene import (
    FileInfo,
    check_dataset,
    duplicate_groups,
    format_report,
    inspect_files,
    inspect_image,
    summarize_groups,
)
from tests.helpers.files import rewrite_keeping_size_and_mtime


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@pytest.fixture(autouse=True)
def _cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check-data caches its inspections like training does: in the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def main(args: list[str]) -> int:
    """The command as the README runs it."""
    from covid_lightning.cli import main as cli_main

    return cli_main(["check-data", *args])


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the demo dataset (8 images + masks per class)."""
    return Path(shutil.copytree(demo_root, tmp_path / "COVID-19_Radiography_Dataset"))


def _demo_gray(demo_root: Path, name: str = "COVID-1.png", cls: str = "COVID") -> np.ndarray:
    with Image.open(demo_root / cls / "images" / name) as im:
        return np.asarray(im.convert("L"))


# --------------------------------------------------------------------------------------------
# inspect_image
# --------------------------------------------------------------------------------------------


def test_good_image(demo_root: Path):
    path = demo_root / "COVID" / "images" / "COVID-1.png"
    info = inspect_image(path)
    assert info.ok and info.problem is None
    assert (info.width, info.height, info.size, info.format) == (299, 299, "299x299", "PNG")
    assert len(info.content_hash) == 64 and 0 <= info.phash < 2**64
    assert info.mask_values is None and info.mask_binary is None


def test_bad_files(demo_root: Path, tmp_path: Path):
    good = (demo_root / "COVID" / "images" / "COVID-1.png").read_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"this is not a PNG at all" * 10)
    (tmp_path / "half.png").write_bytes(good[: len(good) // 2])
    broken = bytearray(good)
    broken[len(good) // 2 : len(good) // 2 + 200] = b"\x00" * 200  # corrupt compressed data
    (tmp_path / "broken.png").write_bytes(bytes(broken))

    zero = inspect_image(tmp_path / "zero.png")
    assert not zero.ok and zero.problem == "zero-byte file" and zero.phash is None
    garbage = inspect_image(tmp_path / "garbage.png")
    assert not garbage.ok and garbage.problem == "not an image: cannot identify image file"
    half = inspect_image(tmp_path / "half.png")
    assert not half.ok and half.problem.startswith("truncated PNG: image file is truncated")
    assert half.width is None  # nothing half-reported
    broken_info = inspect_image(tmp_path / "broken.png")
    assert not broken_info.ok and broken_info.problem.startswith("corrupt PNG")
    missing = inspect_image(tmp_path / "missing.png")
    assert not missing.ok and missing.problem.startswith("cannot open")


def test_modes_and_content_hash(demo_root: Path, tmp_path: Path):
    """16-bit, RGB (R=G=B), RGBA, palette: all readable; the same gray pixels give the same content hash."""
    gray = _demo_gray(demo_root)
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    rgba = np.dstack([np.repeat(gray[..., None], 3, axis=2), np.full_like(gray, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    Image.fromarray(gray).save(tmp_path / "l_compressed.png", compress_level=9)  # other bytes, same pixels

    infos = {p.stem: inspect_image(p) for p in sorted(tmp_path.glob("*.png"))}
    assert all(i.ok for i in infos.values()), infos
    assert infos["i16"].mode.startswith("I;16") and infos["p"].mode == "P" and infos["rgba"].mode == "RGBA"
    reference = infos["l"].content_hash
    for name in ("i16", "rgb", "rgba", "l_compressed"):
        assert infos[name].content_hash == reference, name
        assert infos[name].phash == infos["l"].phash, name
    assert infos["p"].ok and hamming(infos["p"].phash, infos["l"].phash) <= 6  # palette quantisation


def test_mask_values(tmp_path: Path):
    binary = np.zeros((256, 256), np.uint8)
    binary[50:200, 30:120] = 255
    Image.fromarray(np.repeat(binary[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    Image.fromarray(binary // 255).save(tmp_path / "zero_one.png")
    Image.fromarray(np.zeros_like(binary)).save(tmp_path / "empty.png")
    soft = binary.copy()
    soft[100:110, 40:60] = np.arange(20, dtype=np.uint8) * 10
    Image.fromarray(soft).save(tmp_path / "soft.png")
    infos = {p.stem: inspect_image(p, mask=True) for p in sorted(tmp_path.glob("*.png"))}
    assert infos["rgb"].mask_values == "0,255" and infos["rgb"].mask_binary
    assert infos["zero_one"].mask_values == "0,1" and infos["zero_one"].mask_binary
    assert infos["empty"].mask_values == "0" and infos["empty"].mask_binary
    assert not infos["soft"].mask_binary and infos["soft"].mask_values.endswith("values in 0..255")
    assert infos["rgb"].phash is None and infos["rgb"].content_hash is None  # masks are not hashed


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------


def _brute_force_groups(hashes: list[int], max_distance: int) -> list[set[int]]:
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if hamming(hashes[i], hashes[j]) <= max_distance:
                parent[find(j)] = find(i)
    groups: dict[int, set[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), set()).add(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=min)


def _as_sets(groups: list[int]) -> list[set[int]]:
    return sorted((set(m) for m in hygiene.group_members(groups)), key=min)


def test_duplicate_groups_match_brute_force():
    rng = np.random.default_rng(1)
    hashes = [int(h) for h in rng.integers(0, 2**62, 300, dtype=np.int64)]
    hashes += [h ^ (1 << 63) ^ (1 << 3) for h in hashes[:20]]  # distance 2 (including the top bit)
    hashes += [h ^ 0b111111 for h in hashes[20:30]]  # distance 6
    hashes += [h ^ 0b1111111 for h in hashes[30:40]]  # distance 7: not a duplicate
    hashes += [hashes[300] ^ (0b11 << 10)]  # chain: 0 -- 300 -- this one
    infos = [FileInfo(Path(f"{i}.png"), True, content_hash=str(i), phash=h) for i, h in enumerate(hashes)]
    for chunk in (7, 64, 1000):  # block boundaries must not matter
        groups = duplicate_groups(infos, 6, chunk=chunk)
        assert _as_sets(groups) == _brute_force_groups(hashes, 6)
    groups = duplicate_groups(infos, 6)
    assert len(groups) == len(infos) and groups[0] == 0 and sorted(set(groups)) == list(range(max(groups) + 1))
    assert groups[0] == groups[300] == groups[-1]  # transitive
    assert groups[30] != groups[330]
    assert summarize_groups(groups, [i % 2 for i in range(len(infos))])["groups"] == 30


def test_exact_duplicates_and_unreadable():
    infos = [
        FileInfo(Path("a.png"), True, content_hash="x", phash=0),
        FileInfo(Path("b.png"), True, content_hash="x", phash=2**64 - 1),  # same pixels, whatever the pHash
        FileInfo(Path("c.png"), False, problem="zero-byte file"),
        FileInfo(Path("d.png"), False, problem="zero-byte file"),
        FileInfo(Path("e.png"), True, content_hash="y", phash=0b1),
    ]
    groups = duplicate_groups(infos, max_distance=-1)  # exact only
    assert groups == [0, 0, 1, 2, 3]
    assert duplicate_groups(infos) == [0, 0, 1, 2, 0]
    assert summarize_groups(duplicate_groups(infos), ["COVID", "Normal", "COVID", "COVID", "COVID"]) == {
        "groups": 1,
        "images": 3,
        "cross_class_groups": 1,
        "largest": 3,
    }
    assert duplicate_groups([]) == []


def test_planted_near_duplicates(demo_root: Path, tmp_path: Path):
    """A JPEG q90 re-save and a 299->256 resize join the original's group; other demo images stay apart."""
    images = sorted((demo_root / "Lung_Opacity" / "images").glob("*.png"))
    original = images[0]
    with Image.open(original) as im:
        im.save(tmp_path / "copy q90.jpg", quality=90)
        im.resize((256, 256), Image.Resampling.BILINEAR).save(tmp_path / "resized.png")
    infos = inspect_files([*images, tmp_path / "copy q90.jpg", tmp_path / "resized.png"], workers=2)
    assert all(i.ok for i in infos)
    groups = duplicate_groups(infos)
    assert groups[0] == groups[-1] == groups[-2]
    assert infos[-2].content_hash != infos[0].content_hash  # near, not exact
    assert len(set(groups[1:-2])) == len(images) - 1 and groups[0] not in groups[1:-2]
    nearest_other = min(hamming(infos[0].phash, i.phash) for i in infos[1:-2])
    print(
        f"\nplanted duplicates, pHash distance to the original: JPEG q90 {hamming(infos[0].phash, infos[-2].phash)}, "
        f"resized 256 {hamming(infos[0].phash, infos[-1].phash)}; nearest other demo image {nearest_other}"
    )


def test_hashing_speed_21k():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 21_000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    infos = [FileInfo(Path(f"{i}.png"), True, content_hash=str(i), phash=int(h)) for i, h in enumerate(hashes)]
    start = time.perf_counter()
    groups = duplicate_groups(infos)
    elapsed = time.perf_counter() - start
    print(f"\nduplicate_groups over 21,000 random hashes: {elapsed:.2f} s")
    assert summarize_groups(groups, [0] * len(groups))["groups"] == 0
    assert elapsed < 30


# --------------------------------------------------------------------------------------------
# inspect_files: pool and cache
# --------------------------------------------------------------------------------------------


def test_inspect_files_parallel_matches_serial(demo_root: Path):
    paths = sorted((demo_root / "Normal" / "images").glob("*.png"))
    masks = sorted((demo_root / "Normal" / "masks").glob("*.png"))
    assert inspect_files(paths, workers=3) == inspect_files(paths, workers=1) == [inspect_image(p) for p in paths]
    assert all(i.mask_values == "0,255" for i in inspect_files(masks, masks=True))


def test_cache(demo_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = sorted((demo_copy / "COVID" / "images").glob("*.png"))
    cache = tmp_path / "cache" / "hygiene.json"
    first = inspect_files(paths, cache_file=cache, workers=1)
    assert cache.is_file() and json.loads(cache.read_text())["version"] == hygiene.CACHE_VERSION

    calls: list[Path] = []
    real = hygiene.inspect_image

    def counting(path, **kwargs):
        calls.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(hygiene, "inspect_image", counting)
    assert inspect_files(paths, cache_file=cache, workers=1) == first and calls == []
    # the same files as masks are another entry
    inspect_files(paths[:1], masks=True, cache_file=cache, workers=1)
    assert calls == paths[:1]
    calls.clear()
    # one file changes (size and mtime): only it is decoded again, and the result is fresh
    paths[2].write_bytes(paths[2].read_bytes()[:100])
    again = inspect_files(paths, cache_file=cache, workers=1)
    assert calls == [paths[2]]
    assert not again[2].ok and again[2].problem.startswith("truncated")
    assert again[:2] == first[:2] and again[3:] == first[3:]
    # deleted files are forgotten at the next save
    paths[7].rename(tmp_path / "moved.png")
    inspect_files([tmp_path / "moved.png"], cache_file=cache, workers=1)
    stored = json.loads(cache.read_text())["files"]
    assert len(stored) == 9 and not any(k.endswith(paths[7].name) for k in stored)
    # a broken cache file is ignored, not fatal
    cache.write_text("{not json")
    assert inspect_files(paths[:2], cache_file=cache, workers=1) == first[:2]


@pytest.mark.parametrize("replace", [False, True], ids=["in-place", "rename-over"])
def test_cache_not_fooled_by_same_size_rewrite_with_restored_mtime(demo_copy: Path, tmp_path: Path, replace: bool):
    """A file corrupted to the same size with its mtime put back must be decoded again, not trusted."""
    paths = sorted((demo_copy / "COVID" / "images").glob("*.png"))
    cache = tmp_path / "cache.json"
    assert all(i.ok for i in inspect_files(paths, cache_file=cache, workers=1))
    good = paths[3].read_bytes()
    corrupt = good[: len(good) // 2] + bytes(len(good) - len(good) // 2)  # PNG header intact, data zeroed
    rewrite_keeping_size_and_mtime(paths[3], corrupt, replace=replace)
    again = inspect_files(paths, cache_file=cache, workers=1)
    assert not again[3].ok, "the stale cache entry was trusted"
    assert [i.ok for i in again[:3] + again[4:]] == [True] * 7
    # and the screening a DataModule runs stops on it
    from covid_lightning.data.hygiene import screen_records
    from covid_lightning.data.scan import DatasetError, scan_dataset

    with pytest.raises(DatasetError, match="COVID-4.png"):
        screen_records(scan_dataset(demo_copy), cache_file=cache, duplicates="none")


# --------------------------------------------------------------------------------------------
# check_dataset, format_report, main
# --------------------------------------------------------------------------------------------


def test_check_demo(demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    report = check_dataset(demo_root.parent, workers=2)
    json.dumps(report)  # serialisable
    assert report["root"] == str(demo_root)
    assert report["trainable"] and report["blocking"] == []
    for counts in report["classes"].values():
        assert counts == {"images": 8, "masks": 8, "pairs": 8, "unpaired_images": 0, "orphan_masks": 0}
    assert report["images"]["total"] == report["images"]["readable"] == 32
    assert report["images"]["sizes"] == {"299x299": 32} and set(report["images"]["modes"]) <= {"L", "RGB"}
    assert report["masks"]["sizes"] == {"256x256": 32}
    assert report["masks"]["non_binary"]["count"] == report["masks"]["wrong_size"]["count"] == 0
    assert report["unreadable"] == [] and report["extra_folders"] == []

    out = tmp_path / "out" / "report.json"
    assert main([str(demo_root), "--json", str(out), "--workers", "1"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["trainable"] is True
    text = capsys.readouterr().out
    assert "Trainable: yes" in text and "Viral Pneumonia" in text


def test_check_problems(demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = demo_copy
    covid = root / "COVID"
    # unreadable images: truncated, zero-byte
    good = (covid / "images" / "COVID-1.png").read_bytes()
    (covid / "images" / "COVID-1.png").write_bytes(good[: len(good) // 2])
    (covid / "images" / "COVID-2.png").write_bytes(b"")
    # unpaired image, orphan mask
    (root / "Normal" / "masks" / "Normal-3.png").unlink()
    shutil.copy(root / "Normal" / "masks" / "Normal-4.png", root / "Normal" / "masks" / "Normal-99.png")
    # non-binary mask, mask of another size, a 0/1 mask
    with Image.open(root / "Lung_Opacity" / "masks" / "Lung_Opacity-1.png") as im:
        mask = np.asarray(im.convert("L"))
    soft = mask.copy()
    soft[:8, :] = np.arange(256, dtype=np.uint8)[None, :]
    Image.fromarray(soft).save(root / "Lung_Opacity" / "masks" / "Lung_Opacity-2.png")
    Image.fromarray(mask).resize((299, 299), Image.Resampling.NEAREST).save(
        root / "Lung_Opacity" / "masks" / "Lung_Opacity-3.png"
    )
    Image.fromarray(mask // 255).save(root / "Lung_Opacity" / "masks" / "Lung_Opacity-4.png")
    # non-ASCII and spaces in names, with a mask
    src = root / "Viral Pneumonia"
    shutil.copy(src / "images" / "Viral Pneumonia-1.png", src / "images" / "Viral Pneumonia-é 1.png")
    shutil.copy(src / "masks" / "Viral Pneumonia-1.png", src / "masks" / "Viral Pneumonia-é 1.png")
    # ignored: non-image files, an extra folder
    (root / "COVID.metadata.xlsx").write_bytes(b"PK\x03\x04")
    (covid / "images" / "notes.txt").write_text("x")
    (root / "__MACOSX").mkdir()
    (covid / "old").mkdir()

    report = check_dataset(root, workers=2)
    json.dumps(report)
    assert not report["trainable"]
    assert len(report["blocking"]) == 1 and "2 unreadable image" in report["blocking"][0]
    problems = {u["path"]: u["problem"] for u in report["unreadable"]}
    assert sorted(problems) == ["COVID/images/COVID-1.png", "COVID/images/COVID-2.png"]
    assert problems["COVID/images/COVID-1.png"].startswith("truncated PNG: image file is truncated")
    assert problems["COVID/images/COVID-2.png"] == "zero-byte file"
    assert report["classes"]["COVID"]["images"] == 8  # unreadable files are still counted as present
    assert report["images"]["readable"] == 31 and report["images"]["total"] == 33
    assert report["classes"]["Normal"] == {
        "images": 8,
        "masks": 8,
        "pairs": 7,
        "unpaired_images": 1,
        "orphan_masks": 1,
    }
    assert report["unpaired_images"] == {"count": 1, "examples": ["Normal/images/Normal-3.png"]}
    assert report["orphan_masks"] == {"count": 1, "examples": ["Normal/masks/Normal-99.png"]}
    assert report["classes"]["Viral Pneumonia"]["pairs"] == 9
    masks = report["masks"]
    assert masks["non_binary"]["count"] == 1 and masks["non_binary"]["examples"][0].startswith(
        "Lung_Opacity/masks/Lung_Opacity-2.png"
    )
    assert masks["wrong_size"] == {"count": 1, "examples": ["Lung_Opacity/masks/Lung_Opacity-3.png (299x299)"]}
    assert masks["zero_one"] == {"count": 1, "examples": ["Lung_Opacity/masks/Lung_Opacity-4.png"]}
    assert sorted(report["extra_folders"]) == ["COVID/old", "__MACOSX"]
    # the copy with a non-ASCII name is an exact duplicate of its original
    dup_paths = [p for g in report["duplicates"]["examples"] for p in g["paths"] if g["exact"]]
    assert "Viral Pneumonia/images/Viral Pneumonia-é 1.png" in dup_paths

    text = format_report(report)
    assert "Trainable: NO" in text and "zero-byte file" in text and "COVID/images/COVID-1.png" in text
    assert main([str(root), "--workers", "2"]) == 1
    assert "BLOCKING" in capsys.readouterr().out


def test_check_reports_bad_symlinks(demo_copy: Path, capsys: pytest.CaptureFixture[str]):
    """Dangling symlinks and symlink loops are unreadable files of the report, not silently absent."""
    images, masks = demo_copy / "COVID" / "images", demo_copy / "COVID" / "masks"
    os.symlink(images / "deleted.png", images / "COVID-90.png")
    os.symlink(images / "COVID-92.png", images / "COVID-91.png")
    os.symlink(images / "COVID-91.png", images / "COVID-92.png")
    (masks / "COVID-1.png").unlink()
    os.symlink(masks / "deleted.png", masks / "COVID-1.png")
    report = check_dataset(demo_copy, workers=1)
    problems = {u["path"]: (u["kind"], u["problem"]) for u in report["unreadable"]}
    assert sorted(problems) == [
        "COVID/images/COVID-90.png",
        "COVID/images/COVID-91.png",
        "COVID/images/COVID-92.png",
        "COVID/masks/COVID-1.png",
    ]
    assert problems["COVID/images/COVID-90.png"][1].startswith("dangling symlink")
    assert problems["COVID/images/COVID-91.png"][1].startswith("symlink loop")
    assert problems["COVID/masks/COVID-1.png"][0] == "mask"
    assert report["classes"]["COVID"]["images"] == 11 and report["classes"]["COVID"]["pairs"] == 8
    assert not report["trainable"]
    assert any("3 unreadable image" in b for b in report["blocking"])
    assert any("1 unreadable mask" in b for b in report["blocking"])
    assert main([str(demo_copy), "--workers", "1"]) == 1
    assert "dangling symlink" in capsys.readouterr().out


def test_check_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "No class folders" in capsys.readouterr().err


def test_check_no_images(tmp_path: Path):
    (tmp_path / "COVID" / "images").mkdir(parents=True)
    report = check_dataset(tmp_path, workers=1)
    assert not report["trainable"] and "no images" in report["blocking"][0]
    assert report["missing_classes"] == ["Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert main([str(tmp_path)]) == 1


# --------------------------------------------------------------------------------------------
# The real sample
# --------------------------------------------------------------------------------------------


def test_real_sample(radiography_sample: Path, tmp_path: Path):
    start = time.perf_counter()
    report = check_dataset(radiography_sample, cache_file=tmp_path / "cache.json")
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert check_dataset(radiography_sample, cache_file=tmp_path / "cache.json") == report
    cached = time.perf_counter() - start

    counts = {name: (c["images"], c["masks"]) for name, c in report["classes"].items()}
    assert counts == {"COVID": (18, 1), "Lung_Opacity": (18, 1), "Normal": (22, 1), "Viral Pneumonia": (100, 100)}
    assert report["images"]["modes"] == {"L": 146, "RGB": 12}
    assert report["images"]["sizes"] == {"299x299": 158}
    assert report["masks"]["sizes"] == {"256x256": 103} and report["masks"]["non_binary"]["count"] == 0
    assert report["unpaired_images"]["count"] == 55 and report["orphan_masks"]["count"] == 0
    assert report["unreadable"] == [] and report["trainable"]
    print("\n" + format_report(report))
    print(f"check_dataset on the real sample: {first:.2f} s, cached re-run {cached:.2f} s")
    d = report["duplicates"]
    print(f"duplicate groups (max distance {d['max_distance']}): {json.dumps(d, indent=1)}")

    images = sorted(Path(report["root"]).glob("*/images/*.png"))
    infos = inspect_files(images)
    hashes = np.array([i.phash for i in infos], dtype=np.uint64)
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) if hasattr(np, "bitwise_count") else None
    if dist is not None:
        upper = dist[np.triu_indices(len(images), 1)]
        print(
            f"pHash distances between the {len(images)} real images: min {upper.min()}, "
            f"pairs <= 6: {(upper <= 6).sum()}, <= 10: {(upper <= 10).sum()}, median {int(np.median(upper))}"
        )
