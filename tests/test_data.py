"""Data layer: readers, bad input, near-duplicate control and leak-free splits, on files written here."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedbrain.data.federation import (
    FederationSpec,
    PartitionSpec,
    SiteData,
    SiteSpec,
    build_federation,
    load_site_config,
    summary_table,
)
from fedbrain.data.images import ImageError, decode_grayscale
from fedbrain.data.readers import DataLayoutError, read_csv, read_figshare, read_sartaj, read_yesno


def slice_image(seed: int, size: int = 96) -> np.ndarray:
    """A distinct synthetic 'slice': a bright ellipse plus seeded blobs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 60 * (((xx - 0.5) / 0.4) ** 2 + ((yy - 0.5) / 0.45) ** 2 < 1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
        img = img + rng.uniform(60, 160) * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write(path: Path, arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


@pytest.fixture
def sets(tmp_path: Path) -> dict[str, Path]:
    """Three small 'hospitals' with known overlaps:

    - figshare: 0/ 1/ 2/ with 8 slices each (seeds 0..23)
    - sartaj: Training/ Testing/ with 4 classes; its Training glioma are re-encoded+resized+mirrored copies of
      figshare glioma slices 16..19; its Testing no_tumor has an exact copy of a Training no_tumor image;
      one sartaj pituitary image is a copy of a figshare meningioma (label conflict).
    - yesno: yes/ no/ where two 'no' images are copies of sartaj no_tumor images.
    """
    fig = tmp_path / "fig"
    for folder, seeds in {"0": range(0, 8), "1": range(8, 16), "2": range(16, 24)}.items():
        for s in seeds:
            write(fig / folder / f"{s}.jpg", slice_image(s))
    sar = tmp_path / "sartaj"
    for s in range(16, 20):  # copies of figshare glioma: resized, re-encoded, mirrored
        arr = np.asarray(Image.fromarray(slice_image(s)).resize((128, 128), Image.BILINEAR))
        write(sar / "Training" / "glioma_tumor" / f"g{s}.jpg", arr[:, ::-1].copy())
    for s in range(100, 106):
        write(sar / "Training" / "meningioma_tumor" / f"m{s}.jpg", slice_image(s))
    for s in range(110, 118):
        write(sar / "Training" / "no_tumor" / f"n{s}.jpg", slice_image(s))
    for s in range(120, 126):
        write(sar / "Training" / "pituitary_tumor" / f"p{s}.jpg", slice_image(s))
    write(sar / "Training" / "pituitary_tumor" / "conflict.jpg", slice_image(8))  # figshare says meningioma
    (sar / "Testing" / "no_tumor").mkdir(parents=True)
    (sar / "Testing" / "no_tumor" / "dup.jpg").write_bytes((sar / "Training" / "no_tumor" / "n110.jpg").read_bytes())
    for s in range(130, 134):
        write(sar / "Testing" / "glioma_tumor" / f"t{s}.jpg", slice_image(s))
    yn = tmp_path / "yesno"
    for s in range(200, 206):
        write(yn / "yes" / f"Y{s}.jpg", slice_image(s))
    for s in range(210, 214):
        write(yn / "no" / f"N{s}.png", slice_image(s), "PNG")
    write(yn / "no" / "copy1.jpg", slice_image(111))
    write(yn / "no" / "copy2.jpg", slice_image(112))
    return {"fig": fig, "sartaj": sar, "yesno": yn, "root": tmp_path}


def spec_of(sets, **kw) -> FederationSpec:
    return FederationSpec(sites=[
        SiteSpec("figshare", "figshare", str(sets["fig"])),
        SiteSpec("sartaj", "sartaj", str(sets["sartaj"])),
        SiteSpec("navoneel", "yesno", str(sets["yesno"])),
    ], **kw)


def test_readers_map_folders_to_canonical_labels(sets):
    fig = read_figshare(sets["fig"]).records
    assert Counter(r.label for r in fig) == {"pituitary": 8, "meningioma": 8, "glioma": 8}
    sar = read_sartaj(sets["sartaj"]).records
    assert {r.label for r in sar} == {"glioma", "meningioma", "pituitary", "no_tumor"}
    assert {r.official_split for r in sar} == {"train", "test"}
    yn = read_yesno(sets["yesno"]).records
    assert Counter(r.label for r in yn) == {"tumour": 6, "no_tumor": 6}


def test_wrong_folder_names_the_flag_to_fix(tmp_path):
    with pytest.raises(DataLayoutError, match="--data-root"):
        read_sartaj(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(DataLayoutError, match="Training"):
        read_sartaj(tmp_path / "x")


def test_csv_manifest_with_patient_ids(tmp_path):
    for i in range(3):
        write(tmp_path / "img" / f"{i}.png", slice_image(300 + i), "PNG")
    (tmp_path / "m.csv").write_text("path,label,patient_id\nimg/0.png,glioma,P1\nimg/1.png,glioma,P1\n"
                                    "img/2.png,meningioma,P2\nimg/2.png,banana,P3\n")
    res = read_csv(tmp_path / "m.csv")
    assert [r.patient_id for r in res.records] == ["P1", "P1", "P2"]
    assert sum(res.problems.values()) == 1


def test_deduplication_keeps_each_cluster_at_one_site_and_split(sets):
    fed = build_federation(spec_of(sets, seed=1), cache_dir=sets["root"] / "cache")
    s = fed.summary["sites"]
    # sartaj's 4 glioma copies of figshare slices are dropped there (figshare is listed first)
    assert s["sartaj"]["dropped_cross_site_duplicates"] >= 4
    # the two yes/no copies of sartaj no_tumor images are dropped at navoneel
    assert s["navoneel"]["dropped_cross_site_duplicates"] == 2
    # the Testing copy of a Training image: in-site duplicate, dropped; the official split is rejected
    assert s["sartaj"]["dropped_in_site_duplicates"] == 1
    assert s["sartaj"]["split_policy"].startswith("official split rejected")
    # the meningioma/pituitary conflict is dropped on both sides
    assert s["figshare"]["dropped_label_conflicts"] == 1 and s["sartaj"]["dropped_label_conflicts"] == 1
    # no picture appears twice anywhere (exact pixel content after decode)
    seen = {}
    for name, site in fed.sites.items():
        for split, recs in site.splits.items():
            for r in recs:
                key = decode_grayscale(Path(r.path).read_bytes())[0].tobytes()
                assert key not in seen, (r.path, seen.get(key))
                seen[key] = (name, split)
    assert "distinct" in summary_table(fed.summary)


def test_official_split_is_kept_when_clean(sets, tmp_path):
    clean = tmp_path / "clean"
    for split, seeds in {"Training": range(400, 412), "Testing": range(412, 416)}.items():
        for s in seeds:
            write(clean / split / ("glioma" if s % 2 else "no_tumor") / f"{s}.jpg", slice_image(s))
    fed = build_federation(FederationSpec(sites=[SiteSpec("a", "folders", str(clean), "multiclass")]),
                           cache_dir=tmp_path / "cache")
    site = fed.sites["a"]
    assert site.summary["split_policy"].startswith("official train/test kept")
    assert {Path(r.path).stem for r in site.splits["test"]} == {str(s) for s in range(412, 416)}


def test_bad_files_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "bad"
    good = [write(root / "yes" / f"ok{i}.jpg", slice_image(500 + i)) for i in range(4)]
    good += [write(root / "no" / f"ok{i}.jpg", slice_image(510 + i)) for i in range(4)]
    (root / "no" / "empty.jpg").write_bytes(b"")
    (root / "no" / "text.jpg").write_text("this is not an image")
    data = good[0].read_bytes()
    (root / "yes" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    write(root / "yes" / "rgba.png", slice_image(520), "PNG", "RGBA")
    write(root / "yes" / "cmyk.jpg", slice_image(521), "JPEG", "CMYK")
    arr16 = (slice_image(522).astype(np.uint16) * 257)
    Image.fromarray(arr16).save(root / "no" / "sixteen.png")
    (root / "unknown_class").mkdir()
    fed = build_federation(FederationSpec(sites=[SiteSpec("s", "yesno", str(root))]), cache_dir=tmp_path / "c")
    summ = fed.sites["s"].summary
    assert summ["unusable"] == {"empty file": 1, "not an image": 1, "truncated or corrupt image": 1}
    assert sum(summ["converted"].values()) == 3  # RGBA, CMYK and 16-bit are converted, not lost
    assert summ["distinct_pictures"] == len(good) + 3


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(slice_image(7)).save(buf, "JPEG")
    return buf.getvalue()[:600]


@pytest.mark.parametrize("payload,reason", [
    (b"", "empty file"),
    (b"GIF89a not really", "not an image"),
    (_truncated_jpeg(), "truncated or corrupt image"),
])
def test_decode_reasons(payload, reason):
    with pytest.raises(ImageError) as e:
        decode_grayscale(payload)
    assert e.value.reason == reason


def test_decompression_bomb_and_multiframe_refused():
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")
    with pytest.raises(ImageError, match="too large"):
        decode_grayscale(buf.getvalue())
    buf = io.BytesIO()
    frames = [Image.fromarray(slice_image(i)) for i in range(3)]
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="multi-frame"):
        decode_grayscale(buf.getvalue())


def test_dirichlet_partition_is_seeded_and_leak_free(sets, tmp_path):
    src = SiteSpec("src", "folders", str(sets["sartaj"]), "multiclass")
    spec = FederationSpec(partition=PartitionSpec(src, sites=3, alpha=0.5), seed=3)
    a = build_federation(spec, cache_dir=tmp_path / "c")
    b = build_federation(spec, cache_dir=tmp_path / "c")
    assert list(a.sites) == ["hospital-1", "hospital-2", "hospital-3"]
    paths = [r.path for s in a.sites.values() for recs in s.splits.values() for r in recs]
    assert len(paths) == len(set(paths))
    assert paths == [r.path for s in b.sites.values() for recs in s.splits.values() for r in recs]


def test_split_files_round_trip_and_site_config(sets, tmp_path):
    cfg = tmp_path / "sites.toml"
    cfg.write_text('[federation]\nseed = 2\n\n[[site]]\nname = "h1"\nformat = "yesno"\npath = "yesno"\n')
    spec = load_site_config(cfg, data_root=sets["root"])
    fed = build_federation(spec, cache_dir=tmp_path / "c")
    fed.write(tmp_path / "run")
    back = SiteData.read_split_file("h1", tmp_path / "run" / "splits" / "h1.csv")
    assert {k: len(v) for k, v in back.splits.items()} == {k: len(v) for k, v in fed.sites["h1"].splits.items()}
    assert back.scheme == "binary"


def test_a_split_whose_files_moved_fails_clearly(sets, tmp_path):
    from fedbrain.data.cache import load_arrays

    fed = build_federation(spec_of(sets), cache_dir=tmp_path / "c")
    paths = [r.path for r in fed.sites["figshare"].splits["train"]]
    Path(paths[0]).unlink()
    with pytest.raises(DataLayoutError, match="can no longer be read"):
        load_arrays(paths, 64, cache_dir=tmp_path / "c")


def test_relative_data_root_gives_absolute_split_paths(sets, monkeypatch):
    monkeypatch.chdir(sets["root"])
    res = read_yesno(Path("yesno"))
    assert all(Path(r.path).is_absolute() for r in res.records)
