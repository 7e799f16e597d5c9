"""What a reader can work out from the subgroup audit's published numbers, and the pools that leave nothing small.

**The attacker** (``recoverable``) knows everything published: every row of ``subgroup_metrics`` (views, label
sources, models, findings, attributes), the totals of ``classifier_metrics`` for the test split, and which images
fall in which cell (the conservative assumption: the structure of the data, not its counts). Its unknowns are,
for every *atom* (the images that share their attribute values, "not recorded" included, their label sources and
their label availability under every block's policy), five counts: patients, images, positives, true positives
and false positives. Every published count is an equation (the sum of its atoms), and so is every rate times a
denominator the attacker can work out (TPR times the row's positives; FPR times its negatives when they follow
from the published numbers). A *group* (any set of patients defined by attribute values, by an attribute being
unknown, or by their intersection with a label source's images or a block's label availability) is recovered when
its indicator lies in the row space of those equations: some linear combination of published numbers is its
count. AUCs and interval ends are not linear in the counts and are not used. Patient counts follow the images'
equations (a patient's images count once per atom), so the images' row space answers for both.

A group that is exactly the images of a label source or a block's availability (no attribute narrows it) is the
model's whole test set or its complement, which ``classifier_metrics`` publishes anyway; it is not counted.

**The design that defeats it** (``plan_units``), in three rules:

1. *Unknown is a group.* Every attribute has a "not recorded" value (patients without an admission have no race
   or insurance; patients absent from MIMIC-IV have nothing), pooled like any other when small, so every
   attribute's rows partition the same images and no sum of one attribute's rows differs from another's.
2. *Counts describe the group, not the block.* A row's ``n_patients`` and ``n_images`` are its group's in the
   view and label source, the same in every finding's row; a block's own availability (a finding's uncertain
   labels left out) changes only its positives and its rates. Publishing each block's labelled images would
   publish, by difference with a finding that drops none, each group's uncertain images.
3. *Pools are decided once per view, over every region a difference can isolate*: a unit (a group or a pool of
   groups) must have ``min_patients`` patients or none in the view, in each label source's images, in each
   difference between label sources, and in each block's labelled images; the smallest failing unit joins the
   smallest other unit until none fails. Then the attacker runs on the planned publication; any small group it
   still recovers coarsens the attributes that define it, until it recovers none.

Written here rather than taken from a library: statistical disclosure control tools (sdcMicro, tau-argus) audit
one table's marginals, not the union of a metrics table's blocks with different image sets.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import polars as pl

from cxr_pipeline.data.demographics import ATTRIBUTES

UNKNOWN = "not recorded"  # the group of images whose attribute is unknown
RECORDED = "recorded"  # in the attacker's groups: the attribute known, any value
ALL = "all"  # the name of a unit that holds every group of its attribute
POOL = " + "  # joins the names of pooled groups
BLOCK = ("view", "labels", "model", "slug")
_TOL = 1e-7


def members(group: str, present: Iterable[str]) -> set[str]:
    """The attribute values a published row's ``group`` stands for."""
    return set(present) if group == ALL else set(group.split(POOL))


def with_unknown(scores: pl.DataFrame) -> pl.DataFrame:
    """``scores`` with every unknown attribute value as the group ``UNKNOWN``."""
    return scores.with_columns(pl.col(a).cast(pl.String).fill_null(UNKNOWN) for a in ATTRIBUTES)


class _View:
    """One view's images (every label source), their regions and atoms."""

    def __init__(self, scores: pl.DataFrame):
        s = with_unknown(scores)
        images = s.unique("dicom_id", keep="first").sort("dicom_id")
        self.ids = images["dicom_id"].to_numpy()
        index = {d: i for i, d in enumerate(self.ids.tolist())}
        n = len(self.ids)
        self.subject = images["subject_id"].to_numpy()
        self.attrs = {a: images[a].to_numpy() for a in ATTRIBUTES}
        self.sources = sorted(set(s["labels"].to_list()))
        self.blocks = {}  # block -> (image mask, its images whose raw label is uncertain, uncertain policy, totals)
        for key, part in s.group_by(BLOCK, maintain_order=True):
            rows = np.array([index[d] for d in part["dicom_id"].to_list()])
            mask, unc = np.zeros(n, bool), np.zeros(n, bool)
            mask[rows] = True
            unc[rows[(part["raw"] == -1).fill_null(False).to_numpy()]] = True
            y, called = part["target"].to_numpy(), part["called"].to_numpy()
            totals = {"n_pos": float((y == 1).sum()), "tp": float(((y == 1) & called).sum()), "fp": float(((y == 0) & called).sum())}
            self.blocks[tuple(key)] = (mask, unc, part["policy"][0], totals | {"n_images": float(len(y))})
        self.source = {L: np.any([b[0] for k, b in self.blocks.items() if k[1] == L], axis=0) for L in self.sources}
        regions, self.involves = {"the view": np.ones(n, bool)}, {"the view": set()}
        for L in self.sources:
            regions[f"{L} images"], self.involves[f"{L} images"] = self.source[L], {L}
            for L2 in self.sources:
                if L2 != L and (self.source[L] & ~self.source[L2]).any():
                    regions[f"{L} images without {L2}"] = self.source[L] & ~self.source[L2]
                    self.involves[f"{L} images without {L2}"] = {L, L2}
        for k, b in self.blocks.items():
            regions[f"labelled for {k[3]} ({k[1]}, {k[2]})"], self.involves[f"labelled for {k[3]} ({k[1]}, {k[2]})"] = b[0], {k[1]}
        self.unit_regions = dict(regions)  # where a published unit must have min_patients patients or none (rule 3)
        for k, b in self.blocks.items():  # a group's unlabelled images: a group too, though no row counts them
            regions[f"not labelled for {k[3]} ({k[1]}, {k[2]})"] = self.source[k[1]] & ~b[0]
        self.regions = regions
        codes = [np.unique(v, return_inverse=True)[1] for v in self.attrs.values()]
        signature = np.stack(codes + [b[0].astype(int) + b[1] for b in self.blocks.values()], axis=1) if n else np.zeros((0, 1))
        _, first, self.atom = np.unique(signature, axis=0, return_index=True, return_inverse=True)
        self.atom = self.atom.ravel()
        self.n_atoms = len(first)
        self.atom_attrs = {a: v[first] for a, v in self.attrs.items()}  # an atom's images share their attributes
        _, pcode = np.unique(self.subject, return_inverse=True)
        self.incidence = np.zeros((int(pcode.max()) + 1 if n else 0, self.n_atoms), np.float32)  # patient x atom
        self.incidence[pcode, self.atom] = 1.0

    def patients(self, mask: np.ndarray) -> int:
        return int(np.unique(self.subject[mask]).size)

    def atoms(self, mask: np.ndarray) -> np.ndarray:
        """The atoms ``mask`` covers, as a 0/1 vector (a published set is always a union of atoms)."""
        out = np.zeros(self.n_atoms)
        out[np.unique(self.atom[mask])] = 1.0
        return out

    def patients_of(self, atom_sets: np.ndarray) -> np.ndarray:
        """Patients in each row of ``atom_sets`` (k x atoms, 0/1)."""
        return ((atom_sets.astype(np.float32) @ self.incidence.T) > 0).sum(axis=1)


def small_sources(scores: pl.DataFrame, min_patients: int) -> set[tuple[str, str]]:
    """The (view, label source) pairs with fewer than ``min_patients`` patients: published as one row per attribute,
    ``all``, without numbers (``audit`` marks it small), so they constrain no pool."""
    counts = scores.group_by("view", "labels").agg(pl.col("subject_id").n_unique().alias("n"))
    return {(v, L) for v, L, n in counts.iter_rows() if n < min_patients}


def _unit_ok(view: _View, attribute: str, unit: tuple[str, ...], min_patients: int, small: set[str]) -> bool:
    m = np.isin(view.attrs[attribute], unit)
    regions = (r for k, r in view.unit_regions.items() if not view.involves[k] & small)
    return all(not (0 < view.patients(m & r) < min_patients) for r in regions)


def _merge_smallest(view: _View, attribute: str, units: list[tuple[str, ...]], bad: list[tuple[str, ...]]) -> list:
    size = {u: view.patients(np.isin(view.attrs[attribute], u)) for u in units}
    u = min(bad, key=lambda x: (size[x], x))
    w = min((x for x in units if x != u), key=lambda x: (size[x], x))
    return [x for x in units if x not in (u, w)] + [tuple(sorted(u + w))]


def unit_name(unit: tuple[str, ...], present: Iterable[str]) -> str:
    """A unit's published name: its groups joined, or ``all`` when it holds every group of its attribute (a single
    group's name would say every patient of the view is in it)."""
    return ALL if set(unit) >= set(present) else POOL.join(unit)


def plan_units(scores: pl.DataFrame, min_patients: int, max_rounds: int = 200) -> dict[tuple[str, str], list[tuple[str, ...]]]:
    """Each view's units per attribute ({(view, attribute): [unit, ...]}): rules 1-3 of the module docstring, then
    coarsened until ``recoverable`` finds no small group in the publication they make (``publication_shape``)."""
    out = {}
    for (name,), part in scores.group_by(["view"], maintain_order=True):
        view = _View(part)
        small = {L for v, L in small_sources(part, min_patients)}
        units = {a: [(v,) for v in sorted(set(view.attrs[a].tolist()))] for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            while len(units[a]) > 1 and (bad := [u for u in units[a] if not _unit_ok(view, a, u, min_patients, small)]):
                units[a] = _merge_smallest(view, a, units[a], bad)
        for _ in range(max_rounds):
            shape = publication_shape(part, {(name, a): u for a, u in units.items()}, min_patients)
            found = _recover(view, shape, min_patients, "view", True)
            if not found:
                break
            units = _coarsen(view, units, found)
        else:
            raise RuntimeError(f"{name}: small groups still recoverable after {max_rounds} rounds of pooling")
        out.update({(name, a): sorted(u, key=lambda x: (x == (UNKNOWN,), x)) for a, u in units.items()})
    return out


def _coarsen(view: _View, units: dict, found: list[dict]) -> dict:
    """One step coarser: for the simplest group the attacker recovered (fewest attributes, then fewest patients),
    the unit holding its value in the attribute with the most units joins the smallest other unit of it."""
    g = min(found, key=lambda g: (len(g["attributes"]), g["patients"], g["name"]))
    choices = [a for a in sorted(g["attributes"]) if len(units[a]) > 1]
    if not choices:
        raise RuntimeError(f"{g['name']} ({g['quantity']}) is recoverable with one unit per attribute")
    a = max(choices, key=lambda a: len(units[a]))
    value = g["values"][a]
    hit = [u for u in units[a] if value in u] if value != RECORDED else [u for u in units[a] if UNKNOWN not in u]
    return {**units, a: _merge_smallest(view, a, units[a], hit or units[a])}


def publication_shape(scores: pl.DataFrame, units: dict, min_patients: int) -> pl.DataFrame:
    """The rows a plan publishes, with every count and rate marked present (1.0) where the audit could publish it
    (a small label source publishes none): what ``recoverable`` needs to judge a plan before any statistic is
    computed."""
    s = with_unknown(scores)
    small = small_sources(s, min_patients)
    rows = []
    for key, part in s.group_by(BLOCK, maintain_order=True):
        if (key[0], key[1]) in small:
            continue
        for a in ATTRIBUTES:
            for u in units[(key[0], a)]:
                if part[a].is_in(list(u)).any():
                    present = units_present(units[(key[0], a)])
                    rows.append({**dict(zip(BLOCK, key, strict=True)), "attribute": a, "group": unit_name(u, present)} | _ONES)
    return pl.DataFrame(rows) if rows else pl.DataFrame()


_ONES = {"n_patients": 1.0, "n_images": 1.0, "n_pos": 1.0, "tpr": 1.0, "fpr": 1.0}


def units_present(units: list[tuple[str, ...]]) -> list[str]:
    return [v for u in units for v in u]


def recoverable(scores: pl.DataFrame, published: pl.DataFrame, min_patients: int, counts: str = "view") -> pl.DataFrame:
    """Every small group (1 to ``min_patients`` - 1 patients) whose count the attacker recovers from ``published``
    (rows as ``subgroup_metrics`` has them; a null number is not published) and the test split's totals; ``scores``:
    the audit's long table with ``raw`` (the label as released) and ``policy`` (the block's uncertain policy).
    ``counts``: ``view`` if a row's ``n_images`` counts its group in the view and label source (this design),
    ``block`` if it counts the block's labelled images (the publication before it). Returns one row per group
    and quantity: view, quantity, group, patients, and ``value`` (what the published numbers give for it)."""
    found = []
    for (name,), part in scores.group_by(["view"], maintain_order=True):
        pub = published.filter(pl.col("view") == name) if published.height else published
        for g in _recover(_View(part), pub, min_patients, counts, False):
            found.append({"view": name, "quantity": g["quantity"], "group": g["name"], "patients": g["patients"], "value": g["value"]})
    return pl.DataFrame(
        found, schema={"view": pl.String, "quantity": pl.String, "group": pl.String, "patients": pl.Int64, "value": pl.Float64}
    )


class _System:
    """Equations over one family of unknowns (slots), with their right-hand sides."""

    def __init__(self, n: int):
        self.n, self.rows, self.rhs, self._basis = n, [], [], None

    def add(self, vector: np.ndarray, value: float) -> None:
        self.rows.append(vector)
        self.rhs.append(value)
        self._basis = None

    def basis(self) -> np.ndarray:
        if self._basis is None:
            from scipy.linalg import orth

            self._basis = orth(np.array(self.rows).T) if self.rows else np.zeros((self.n, 0))
        return self._basis

    def contains(self, v: np.ndarray, offset: int = 0) -> np.ndarray:
        """Which rows of ``v`` (k x m, placed at slots ``offset`` .. ``offset + m``) lie in the row space: the
        residual of the projection onto the orthonormal basis vanishes."""
        q = self.basis()[offset : offset + v.shape[1]]
        proj = v @ q
        norm2 = (v * v).sum(axis=1)
        return norm2 - (proj * proj).sum(axis=1) <= (1e-6 * np.maximum(1.0, np.sqrt(norm2))) ** 2

    def value(self, v: np.ndarray, offset: int = 0) -> float:
        """What the published numbers give for the slots ``v`` (placed at ``offset``): the combination of the
        equations that makes ``v``, applied to their right-hand sides."""
        full = np.zeros(self.n)
        full[offset : offset + len(v)] = v
        w = np.linalg.lstsq(np.array(self.rows).T, full, rcond=None)[0]
        return float(w @ np.nan_to_num(np.array(self.rhs, dtype=float)))


def _recover(view: _View, pub: pl.DataFrame, min_patients: int, counts: str, structural: bool) -> list[dict]:
    """The small groups ``pub`` (one view's rows) and the test split's totals give away (see ``recoverable``)."""
    A = view.n_atoms
    pairs = sorted({(k[1], k[3]) for k in view.blocks})
    main = _System(A * (1 + len(pairs)))  # images, then positives per (label source, finding)
    slot = {p: (i + 1) * A for i, p in enumerate(pairs)}
    rates = defaultdict(lambda: _System(A))  # (block, "tp" | "fp") -> equations

    def vec(mask: np.ndarray, offset: int = 0) -> np.ndarray:
        v = np.zeros(main.n)
        v[offset : offset + A] = view.atoms(mask)
        return v

    def positives(b: tuple, m: np.ndarray) -> np.ndarray:
        mask, unc, policy, _ = view.blocks[b]
        v = vec(m & mask & ~unc, slot[(b[1], b[3])])  # an uncertain label has no positive of its own
        return v + vec(m & mask & unc) if policy == "ones" else v  # U-Ones: it counts as one

    everything = np.ones(len(view.ids), bool)
    equations = [(b, everything, None) for b in view.blocks if b[0] == "test"]  # classifier_metrics' totals
    for r in pub.iter_rows(named=True) if pub.height else []:
        b = tuple(r[k] for k in BLOCK)
        if b in view.blocks:
            present = set(view.attrs[r["attribute"]].tolist())
            equations.append((b, np.isin(view.attrs[r["attribute"]], list(members(r["group"], present))), r))
    pending_fp = []
    for b, m, r in equations:
        mask, _, _, totals = view.blocks[b]
        if r is None:  # a total: n, n_pos, TP (sensitivity x n_pos) and FP ((1 - specificity) x n_neg)
            main.add(vec(mask), totals["n_images"])
            main.add(positives(b, m), totals["n_pos"])
            rates[(b, "tp")].add(view.atoms(mask), totals["tp"])
            rates[(b, "fp")].add(view.atoms(mask), totals["fp"])
            continue
        if r.get("n_images") is not None:
            main.add(vec(m & (view.source[b[1]] if counts == "view" else mask)), r["n_images"])
        if r.get("n_pos") is not None:
            main.add(positives(b, m), r["n_pos"])
            if r.get("tpr") is not None:
                rates[(b, "tp")].add(view.atoms(m & mask), r["tpr"] * r["n_pos"])
        if r.get("fpr") is not None:
            pending_fp.append((b, m, r))
    for b, m, r in pending_fp:  # FPR x negatives, where the negatives follow from what is published
        mask = view.blocks[b][0]
        neg = vec(m & mask) - positives(b, m)
        if main.contains(neg[None])[0]:
            rates[(b, "fp")].add(view.atoms(m & mask), r["fpr"] * main.value(neg))
    return _small_groups(view, min_patients, main, slot, rates, structural)


def _candidates(view: _View) -> tuple[np.ndarray, list[tuple[str, dict]], np.ndarray]:
    """Every set of atoms defined by attribute values (one to all four attributes, "not recorded" included), alone
    or within a region (a label source, a difference of label sources, a block's labelled or unlabelled images):
    (k x atoms 0/1, their names and values), and the regions' own atom sets (attribute-free: never a group)."""
    region_names = list(view.regions)
    regions = np.array([view.atoms(view.regions[r]) for r in region_names])
    sets, names = [], []
    for k in range(1, len(ATTRIBUTES) + 1):
        for attrs in itertools.combinations(ATTRIBUTES, k):
            combos = {tuple(view.atom_attrs[a][i] for a in attrs) for i in range(view.n_atoms)}
            # "recorded": the attribute known, whatever its value (patients with a sex but no race are such a group)
            combos |= {tuple(RECORDED if a == b else v for a, v in zip(attrs, c, strict=True)) for c in combos for b in attrs}
            for combo in sorted(combos):
                conj = np.all([_matches(view.atom_attrs[a], v) for a, v in zip(attrs, combo, strict=True)], axis=0)
                values = dict(zip(attrs, combo, strict=True))
                label = " & ".join(f"{a}={v}" for a, v in values.items())
                for i, rname in enumerate(region_names):
                    sets.append(conj * regions[i])
                    names.append((f"{label} in {rname}", values))
    return np.array(sets), names, regions


def _matches(values: np.ndarray, value: str) -> np.ndarray:
    return values != UNKNOWN if value == RECORDED else values == value


def _small_groups(view: _View, min_patients: int, main: _System, slot: dict, rates: dict, structural: bool) -> list[dict]:
    sets, names, regions = _candidates(view)
    found = []

    def test(system: _System, domain: np.ndarray, offset: int, quantity: str) -> None:
        g = sets * domain
        n = view.patients_of(g)
        keep = (n > 0) & (n < min_patients)
        free = {tuple(r) for r in regions * domain}  # attribute-free sets: what classifier_metrics publishes
        idx, seen = [], set()
        for i in np.flatnonzero(keep):
            key = tuple(g[i])
            if key not in free and key not in seen:
                seen.add(key)
                idx.append(i)
        if not idx:
            return
        for i in np.array(idx)[system.contains(g[idx], offset)]:
            name, values = names[i]
            value = None if structural else system.value(g[i], offset)
            found.append(
                {"quantity": quantity, "name": name, "values": values, "attributes": set(values), "patients": int(n[i]), "value": value}
            )

    test(main, np.ones(view.n_atoms), 0, "images")
    for (L, f), offset in slot.items():
        pair = [b for k, b in view.blocks.items() if (k[1], k[3]) == (L, f)]
        domain = view.atoms(np.any([b[0] for b in pair], axis=0) & ~np.any([b[1] for b in pair], axis=0))
        test(main, domain, offset, f"positives {f} ({L})")
    for (b, kind), system in rates.items():
        if structural and found:
            break
        test(system, view.atoms(view.blocks[b][0]), 0, f"{kind} {b[3]} ({b[1]}, {b[2]})")
    return found
