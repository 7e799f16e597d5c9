"""What a reader can work out from the subgroup audit's published numbers, and the pools that leave nothing small.

**The attacker** (``recoverable``) knows everything published: every row of ``subgroup_metrics`` (views, label
sources, models, findings, attributes), the totals of ``classifier_metrics`` for the test split (n, positives,
true and false positives of each block), and which images fall in which cell (the conservative assumption: the
structure of the data, not its counts). Its unknowns, for every *atom* of a finding (the images that share their
attribute values, "not recorded" included, their label sources, and their label availability under each block's
policy for that finding), are the images, the positives under each label source, and each block's true and false
positives. Every published count is an equation (the sum of its atoms), and so is every published rate, as
numerator minus rate times denominator equals zero (a TPR: true positives minus TPR times positives; an FPR: false
positives minus FPR times the labelled images less the positives), so a rate whose denominator is not published
still counts. A *group* (any set of images defined by attribute values, "not recorded" and "recorded" included,
alone or intersected with a label source, the difference of two, a block's labelled or unlabelled images, the
difference of two blocks' labelled images, or a block's uncertain labels) is recovered when its indicator lies in
the row space. Patients have a system of their own (a patient is in a row when any of its images is): atoms are
the patients sharing attribute values and label sources, equations the published patient counts. AUCs and
interval ends are not linear in the counts and are not used; an AUC's exact value does name its negatives, so rule 3
hides it wherever its negatives are not public already. A group that is exactly an attribute-free set (a
label source's images, a block's unlabelled images) is what ``classifier_metrics`` publishes anyway; not counted.

Findings share only the image counts (a block's positives, true and false positives are that finding's alone), so
the attacker solves one system per view and finding (the image equations repeated in each), not one for the whole
table: the same row space for every question it can answer, at a size a 2-core machine solves in seconds.

**The design that defeats it** (``plan_units``):

1. *Unknown is a group.* Every attribute has a "not recorded" value, pooled like any other when small, so every
   attribute's rows partition the same images. Attributes are the patient's (age: the band of its first study in
   the view), so every attribute's rows partition the same patients too.
2. *Counts describe the group, not the block.* A row's ``n_patients`` and ``n_images`` are its group's in the view
   and label source, the same in every finding's row. Publishing each block's labelled images would publish, by
   difference with a finding that drops none, each group's uncertain images.
3. *An FPR, and an AUC, are published only where their block reads every image of the label source*: where a
   block leaves some out (uncertain labels under U-Ignore, blanks under a blank policy of ignore), the FPR equations
   (the group's and, through the gap, the rest's) and the block's totals solve for a group's labelled images, and so
   its unlabelled ones; so does an AUC, not linearly but exactly (C / (n_pos x N) in full precision has few integer
   N, and the rows' N must sum to the block's negatives). Where the block reads every image, N = n_images - n_pos is
   public already. TPR (over the positives, published) and "No Finding"'s FPR and AUC (no label of it is ever left
   out) stay.
4. *Pools are decided once per view*: a unit (a group or a pool of groups) must have ``min_patients`` patients or
   none in each label source, in each difference of label sources (patients with no image in the other too), and
   in each block's labelled images; the smallest failing unit joins the smallest other unit until none fails. Then
   the attacker runs on the planned publication (rates drawn at random: a generic rank, never below the real
   one's); any small group it recovers coarsens the attribute that defines it, until it recovers none.

Written here rather than taken from a library: statistical disclosure control tools (sdcMicro, tau-argus) audit
one table's marginals, not the union of a metrics table's blocks with different image sets.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import polars as pl

from cxr_pipeline.data.demographics import ATTRIBUTES

UNKNOWN = "not recorded"  # the group of images whose attribute is unknown
RECORDED = "recorded"  # in the attacker's groups: the attribute known, any value
ALL = "all"  # the name of a unit that holds every group of its attribute
POOL = " + "  # joins the names of pooled groups
BLOCK = ("view", "labels", "model", "slug")
PUBLISHED = ("n_patients", "n_images", "n_pos", "tpr", "fpr")


def members(group: str, present: Iterable[str]) -> set[str]:
    """The attribute values a published row's ``group`` stands for."""
    return set(present) if group == ALL else set(group.split(POOL))


def with_unknown(scores: pl.DataFrame) -> pl.DataFrame:
    """``scores`` with every unknown attribute value as the group ``UNKNOWN``."""
    return scores.with_columns(pl.col(a).cast(pl.String).fill_null(UNKNOWN) for a in ATTRIBUTES)


def unit_name(unit: tuple[str, ...], present: Iterable[str]) -> str:
    """A unit's published name: its groups joined, or ``all`` when it holds every group of its attribute (a single
    group's name would say every patient of the view is in it)."""
    return ALL if set(unit) >= set(present) else POOL.join(unit)


def units_present(units: list[tuple[str, ...]]) -> list[str]:
    return [v for u in units for v in u]


def small_sources(scores: pl.DataFrame, min_patients: int) -> set[tuple[str, str]]:
    """The (view, label source) pairs with fewer than ``min_patients`` patients: published as one row per attribute,
    ``all``, without numbers (``audit`` marks it small), so they constrain no pool."""
    counts = scores.group_by("view", "labels").agg(pl.col("subject_id").n_unique().alias("n"))
    return {(v, L) for v, L, n in counts.iter_rows() if n < min_patients}


def fpr_publishable(source_images: int, block_images: int) -> bool:
    """Rule 3: an FPR (and its gap, whose other side is the rest of the block) and an AUC are published only where the
    block reads every image of its label source: otherwise they and the totals solve for a group's labelled images."""
    return source_images == block_images


class _View:
    """One view's images (every label source and finding): attributes, label sources, blocks."""

    def __init__(self, scores: pl.DataFrame):
        s = with_unknown(scores)
        images = s.unique("dicom_id", keep="first").sort("dicom_id")
        self.ids = images["dicom_id"].to_numpy()
        index = {d: i for i, d in enumerate(self.ids.tolist())}
        n = len(self.ids)
        self.subject = images["subject_id"].to_numpy()
        _, self.pcode = np.unique(self.subject, return_inverse=True)
        self.n_patients = int(self.pcode.max()) + 1 if n else 0
        self.attrs = {a: images[a].to_numpy() for a in ATTRIBUTES}
        self.sources = sorted(set(s["labels"].to_list()))
        self.blocks = {}  # block -> (image mask, its images with an uncertain raw label, uncertain policy, totals)
        for key, part in s.group_by(BLOCK, maintain_order=True):
            rows = np.array([index[d] for d in part["dicom_id"].to_list()])
            mask, unc = np.zeros(n, bool), np.zeros(n, bool)
            mask[rows] = True
            unc[rows[(part["raw"] == -1).fill_null(False).to_numpy()]] = True
            y, called = part["target"].to_numpy(), part["called"].to_numpy()
            totals = {"n": float(len(y)), "pos": float((y == 1).sum()), "tp": float(((y == 1) & called).sum())}
            totals["fp"] = float(((y == 0) & called).sum())
            self.blocks[tuple(key)] = (mask, unc, part["policy"][0], totals)
        self.source = {L: np.any([b[0] for k, b in self.blocks.items() if k[1] == L], axis=0) for L in self.sources}
        self.slugs = sorted({k[3] for k in self.blocks})

    def patients(self, mask: np.ndarray) -> int:
        return int(np.unique(self.pcode[mask]).size)

    def patient_mask(self, mask: np.ndarray) -> np.ndarray:
        """The images of the patients with any image in ``mask``."""
        hit = np.zeros(self.n_patients, bool)
        hit[self.pcode[mask]] = True
        return hit[self.pcode]

    def regions(self, slug: str | None) -> dict[str, tuple[np.ndarray, set[str]]]:
        """Attribute-free image sets a difference of published numbers can isolate: name -> (mask, the label sources
        it rests on). ``slug``: add that finding's blocks' labelled, unlabelled, uncertain and pairwise-differing
        images."""
        n = len(self.ids)
        out = {"the view": (np.ones(n, bool), set())}
        for L in self.sources:
            out[f"{L} images"] = (self.source[L], {L})
            for L2 in self.sources:
                if L2 != L and (self.source[L] & ~self.source[L2]).any():
                    out[f"{L} images without {L2}"] = (self.source[L] & ~self.source[L2], {L, L2})
                    only = self.source[L] & ~self.patient_mask(self.source[L2])
                    out[f"patients with {L} images and none with {L2}"] = (only, {L, L2})
        mine = {k: b for k, b in self.blocks.items() if k[3] == slug}
        for k, (mask, unc, _, _) in mine.items():
            out[f"labelled for {k[3]} ({k[1]}, {k[2]})"] = (mask, {k[1]})
            out[f"not labelled for {k[3]} ({k[1]}, {k[2]})"] = (self.source[k[1]] & ~mask, {k[1]})
            if unc.any():
                out[f"uncertain for {k[3]} ({k[1]})"] = (unc, {k[1]})
            for k2, (mask2, _, _, _) in mine.items():
                if k2 != k and k2[1] == k[1] and (mask & ~mask2).any():
                    out[f"labelled for {k[3]} ({k[1]}) by {k[2]}, not {k2[2]}"] = (mask & ~mask2, {k[1]})
        return out


def _sized_regions(view: _View, small: set[str]) -> list[np.ndarray]:
    """Rule 4's regions: the view's, and each block's labelled images, less those of a small label source."""
    sized = [r for k, (r, on) in view.regions(None).items() if not on & small]
    for slug in view.slugs:
        sized += [r for k, (r, on) in view.regions(slug).items() if k.startswith("labelled for") and " by " not in k and not on & small]
    return sized


def _unit_ok(view: _View, attribute: str, unit: tuple[str, ...], min_patients: int, sized: list[np.ndarray]) -> bool:
    """Rule 4: ``min_patients`` patients or none in every region a published count rests on (``_sized_regions``)."""
    m = np.isin(view.attrs[attribute], unit)
    return all(not (0 < view.patients(m & r) < min_patients) for r in sized)


def _merge_smallest(view: _View, attribute: str, units: list[tuple[str, ...]], bad: list[tuple[str, ...]]) -> list:
    size = {u: view.patients(np.isin(view.attrs[attribute], u)) for u in units}
    u = min(bad, key=lambda x: (size[x], x))
    w = min((x for x in units if x != u), key=lambda x: (size[x], x))
    return [x for x in units if x not in (u, w)] + [tuple(sorted(u + w))]


def _coarsen(view: _View, units: dict, found: list[dict]) -> dict:
    """One step coarser: for the simplest group the attacker recovered (fewest attributes, then fewest patients),
    the unit holding its value in the attribute with the most units joins the smallest other unit of it."""
    g = min(found, key=lambda g: (len(g["values"]), g["patients"], g["name"]))
    choices = [a for a in sorted(g["values"]) if len(units[a]) > 1]
    if not choices:
        raise RuntimeError(f"{g['name']} ({g['quantity']}) is recoverable with one unit per attribute")
    a = max(choices, key=lambda a: len(units[a]))
    value = g["values"][a]
    hit = [u for u in units[a] if value in u] if value != RECORDED else [u for u in units[a] if UNKNOWN not in u]
    return {**units, a: _merge_smallest(view, a, units[a], hit or units[a])}


def plan_units(scores: pl.DataFrame, min_patients: int, max_rounds: int = 200) -> dict[tuple[str, str], list[tuple[str, ...]]]:
    """Each view's units per attribute ({(view, attribute): [unit, ...]}): rules 1 and 4 of the module docstring,
    then coarsened until ``recoverable`` finds no small group in the publication they make (``publication_shape``)."""
    out = {}
    rng = np.random.default_rng(0)
    for (name,), part in scores.group_by(["view"], maintain_order=True):
        view = _View(part)
        small = {L for _, L in small_sources(part, min_patients)}
        units = {a: [(v,) for v in sorted(set(view.attrs[a].tolist()))] for a in ATTRIBUTES}
        sized = _sized_regions(view, small)  # once per view, not per unit checked
        for a in ATTRIBUTES:
            while len(units[a]) > 1 and (bad := [u for u in units[a] if not _unit_ok(view, a, u, min_patients, sized)]):
                units[a] = _merge_smallest(view, a, units[a], bad)
        for _ in range(max_rounds):
            shape = publication_shape(part, {(name, a): u for a, u in units.items()}, min_patients, rng)
            found = _recover(view, shape, min_patients, "view", first_only=True)
            if not found:
                break
            units = _coarsen(view, units, found)
        else:
            raise RuntimeError(f"{name}: small groups still recoverable after {max_rounds} rounds of pooling")
        out.update({(name, a): sorted(u, key=lambda x: (x == (UNKNOWN,), x)) for a, u in units.items()})
    return out


def publication_shape(scores: pl.DataFrame, units: dict, min_patients: int, rng: np.random.Generator) -> pl.DataFrame:
    """The rows a plan publishes, each count present (its value irrelevant to the row space) and each rate drawn at
    random in (0, 1) where the audit would publish it (the FPR only under rule 3; a small label source: nothing):
    what ``recoverable`` needs to judge a plan before any statistic is computed."""
    s = with_unknown(scores)
    small = small_sources(s, min_patients)
    sources = {k: part["dicom_id"].n_unique() for k, part in s.group_by(["view", "labels"])}
    rows = []
    for key, part in s.group_by(BLOCK, maintain_order=True):
        if (key[0], key[1]) in small:
            continue
        full = fpr_publishable(sources[(key[0], key[1])], part.height)
        for a in ATTRIBUTES:
            present = units_present(units[(key[0], a)])
            for u in units[(key[0], a)]:
                if not part[a].is_in(list(u)).any():
                    continue
                head = dict(zip(BLOCK, key, strict=True))
                rows.append(head | {"attribute": a, "group": unit_name(u, present), "n_patients": 1, "n_images": 1, "n_pos": 1})
                tpr, fpr = (float(x) for x in rng.uniform(0.05, 0.95, 2))
                gaps = rng.uniform(-0.3, 0.3, 2)
                rows[-1] |= {
                    "tpr": tpr,
                    "tpr_gap": float(gaps[0]),
                    "fpr": fpr if full else None,
                    "fpr_gap": float(gaps[1]) if full else None,
                }
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def recoverable(scores: pl.DataFrame, published: pl.DataFrame, min_patients: int, counts: str = "view") -> pl.DataFrame:
    """Every small group (1 to ``min_patients`` - 1 patients) whose count the attacker recovers from ``published``
    (rows as ``subgroup_metrics`` has them; a null number is not published) and the test split's totals; ``scores``:
    the audit's rows (``subgroups.prepare``: ``raw``, ``policy`` and ``called`` per image). ``counts``: ``view`` if a
    row's ``n_images`` and ``n_patients`` count its group in the view and label source (this design), ``block`` if
    they count the block's labelled images (the publication before it). One row per group and quantity: view,
    quantity, group, patients, and ``value`` (what the published numbers give for it)."""
    found = []
    for (name,), part in scores.group_by(["view"], maintain_order=True):
        pub = published.filter(pl.col("view") == name) if published.height else published
        for g in _recover(_View(part), pub, min_patients, counts, first_only=False):
            found.append({"view": name, "quantity": g["quantity"], "group": g["name"], "patients": g["patients"], "value": g["value"]})
    schema = {"view": pl.String, "quantity": pl.String, "group": pl.String, "patients": pl.Int64, "value": pl.Float64}
    return pl.DataFrame(found, schema=schema)


def _rows(view: _View, pub: pl.DataFrame) -> list[tuple[tuple, np.ndarray, dict]]:
    """Each published row with its block and the mask of its group's images."""
    out = []
    for r in pub.iter_rows(named=True) if pub.height else []:
        b = tuple(r[k] for k in BLOCK)
        if b in view.blocks:
            present = set(view.attrs[r["attribute"]].tolist())
            out.append((b, np.isin(view.attrs[r["attribute"]], list(members(r["group"], present))), r))
    return out


def _recover(view: _View, pub: pl.DataFrame, min_patients: int, counts: str, first_only: bool) -> list[dict]:
    """The small groups ``pub`` (one view's rows) and the test split's totals give away (see ``recoverable``)."""
    rows = _rows(view, pub)
    found = _recover_patients(view, rows, min_patients, counts, first_only)
    for slug in view.slugs:
        if first_only and found:
            return found
        found += _recover_finding(view, slug, rows, min_patients, counts, first_only)
    return found


def _rest(r: dict, rate: str) -> float | None:
    """The rest of the block's rate, from the group's and its published gap (gap = group - rest)."""
    return None if r.get(rate) is None or r.get(f"{rate}_gap") is None else r[rate] - r[f"{rate}_gap"]


def _atoms(signature: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.stack(signature, axis=1), axis=0, return_inverse=True)[1].ravel()


def _attribute_codes(view: _View) -> list[np.ndarray]:
    return [np.unique(v, return_inverse=True)[1] for v in view.attrs.values()]


class _System:
    """Linear equations over one finding's (or the patients') unknowns: rows in a list, one orthonormal basis."""

    def __init__(self, n: int):
        self.n, self.rows, self.rhs = n, [], []

    def add(self, terms: list[tuple[int, np.ndarray, float]], value: float) -> None:
        """sum of coef x (the unknowns of family ``offset`` over the atoms in ``vector``) = value."""
        row = np.zeros(self.n)
        for offset, vector, coef in terms:
            row[offset : offset + len(vector)] += coef * vector
        self.rows.append(row)
        self.rhs.append(value)

    def basis(self) -> np.ndarray:
        from scipy.linalg import orth

        return orth(np.array(self.rows).T, rcond=1e-9) if self.rows else np.zeros((self.n, 0))  # numerical rank

    def value(self, v: np.ndarray) -> float:
        w = np.linalg.lstsq(np.array(self.rows).T, v, rcond=None)[0]
        return float(w @ np.nan_to_num(np.array(self.rhs, dtype=float)))


def _in_row_space(basis: np.ndarray, v: np.ndarray) -> np.ndarray:
    proj = v @ basis
    norm2 = (v * v).sum(axis=1)
    return norm2 - (proj * proj).sum(axis=1) <= (1e-6 * np.maximum(1.0, np.sqrt(norm2))) ** 2


def _conjunctions(attrs: dict[str, np.ndarray]) -> list[tuple[dict, np.ndarray]]:
    """Every set defined by attribute values (one to all four attributes, "not recorded" and "recorded" included)
    over the rows of ``attrs`` (atoms)."""
    n = len(next(iter(attrs.values())))
    out = []
    for k in range(1, len(ATTRIBUTES) + 1):
        for names in itertools.combinations(ATTRIBUTES, k):
            combos = {tuple(attrs[a][i] for a in names) for i in range(n)}
            combos |= {tuple(RECORDED if a == b else v for a, v in zip(names, c, strict=True)) for c in combos for b in names}
            for combo in sorted(combos):
                m = np.all([attrs[a] != UNKNOWN if v == RECORDED else attrs[a] == v for a, v in zip(names, combo, strict=True)], axis=0)
                out.append((dict(zip(names, combo, strict=True)), m))
    return out


def _search(
    system: _System,
    atom_attrs: dict,
    regions: dict,
    families: list[tuple[str, int, np.ndarray]],
    patients_of,
    min_patients: int,
    first_only: bool,
) -> list[dict]:
    """The small groups (conjunction x region, restricted to a family's atoms) whose indicator in a family's slots
    lies in the row space. ``regions``: name -> atom mask; ``families``: (quantity, offset, the atoms it is defined
    on); ``patients_of``: atom-set matrix -> patients per row."""
    basis = system.basis()
    conj = _conjunctions(atom_attrs)
    names = list(regions)
    rmat = np.array([regions[k] for k in names], dtype=np.float32)
    found = []
    for quantity, offset, domain in families:
        free = {tuple(r) for r in (rmat * domain).astype(bool)}
        sets, labels = [], []
        for values, cm in conj:
            g = (rmat * (cm & domain)).astype(bool)
            for i in np.flatnonzero(g.any(axis=1)):
                sets.append(g[i])
                labels.append((values, names[i]))
        if not sets:
            continue
        sets = np.array(sets)
        uniq, first = np.unique(sets, axis=0, return_index=True)
        n = patients_of(uniq)
        keep = [j for j in range(len(uniq)) if 0 < n[j] < min_patients and tuple(uniq[j]) not in free]
        if not keep:
            continue
        cand = uniq[keep].astype(np.float64)
        for j in np.flatnonzero(_in_row_space(basis[offset : offset + uniq.shape[1]], cand)):
            values, region = labels[first[keep[j]]]
            label = " & ".join(f"{a}={x}" for a, x in values.items()) + f" in {region}"
            full = np.zeros(system.n)
            full[offset : offset + uniq.shape[1]] = cand[j]
            value = None if first_only else system.value(full)
            found.append({"quantity": quantity, "name": label, "values": values, "patients": int(n[keep[j]]), "value": value})
            if first_only:
                return found
    return found


def _recover_patients(view: _View, rows: list, min_patients: int, counts: str, first_only: bool) -> list[dict]:
    """Patient counts: atoms are patients sharing attribute values and label sources (``counts == "view"``: a row
    counts its group's patients with an image in the label source; ``block``: in the block)."""
    first = np.unique(view.pcode, return_index=True)[1]
    pattrs = {a: v[first] for a, v in view.attrs.items()}
    member = lambda m: view.patient_mask(m)[first]  # noqa: E731  (patients with an image in m)
    basis_masks = {L: member(view.source[L]) for L in view.sources} | {b: member(blk[0]) for b, blk in view.blocks.items()}
    sig = _attribute_codes(view)
    sig = [c[first] for c in sig] + [m.astype(int) for m in basis_masks.values()]
    atom = _atoms(sig)
    A = int(atom.max()) + 1 if len(atom) else 0

    def atoms(pmask: np.ndarray) -> np.ndarray:
        out = np.zeros(A)
        out[np.unique(atom[pmask])] = 1.0
        return out

    system = _System(A)
    for b, m, r in rows:
        if r.get("n_patients") is not None:
            where = basis_masks[b[1]] if counts == "view" else basis_masks[b]
            system.add([(0, atoms(member(m) & where), 1.0)], r["n_patients"])
    if not system.rows:
        return []
    regions = {"the view": np.ones(len(first), bool)} | {f"{L} patients": basis_masks[L] for L in view.sources}
    for L, L2 in itertools.permutations(view.sources, 2):
        regions[f"{L} patients without {L2} images"] = basis_masks[L] & ~basis_masks[L2]
    atom_regions = {k: atoms(m).astype(bool) for k, m in regions.items()}
    atom_attrs = {a: np.array([pattrs[a][np.flatnonzero(atom == i)[0]] for i in range(A)]) for a in ATTRIBUTES}
    inc = np.zeros((A, len(first)), np.float32)
    inc[atom, np.arange(len(first))] = 1.0
    families = [("patients", 0, np.ones(A, bool))]
    return _search(system, atom_attrs, atom_regions, families, lambda s: (s @ inc > 0).sum(1), min_patients, first_only)


def _recover_finding(view: _View, slug: str, rows: list, min_patients: int, counts: str, first_only: bool) -> list[dict]:
    """One finding's system: images (every row's), and its blocks' positives, true and false positives."""
    mine = {k: b for k, b in view.blocks.items() if k[3] == slug}
    sig = _attribute_codes(view) + [view.source[L].astype(int) for L in view.sources]
    sig += [b[0].astype(int) + b[1] for b in mine.values()]
    atom = _atoms(sig)
    A = int(atom.max()) + 1

    def atoms(mask: np.ndarray) -> np.ndarray:
        out = np.zeros(A)
        out[np.unique(atom[mask])] = 1.0
        return out

    fam = {"images": 0}
    for L in sorted({k[1] for k in mine}):
        fam[("pos", L)] = len(fam) * A
    for k in mine:
        fam[("tp", k)], fam[("fp", k)] = (len(fam)) * A, (len(fam) + 1) * A
    system = _System(len(fam) * A)

    def positives(b: tuple, m: np.ndarray) -> list:
        mask, unc, policy, _ = mine[b]
        terms = [(fam[("pos", b[1])], atoms(m & mask & ~unc), 1.0)]  # an uncertain label has no positive of its own
        return terms + [(0, atoms(m & mask & unc), 1.0)] if policy == "ones" else terms  # U-Ones: it counts as one

    everything = np.ones(len(view.ids), bool)
    for b in mine:
        if b[0] == "test":  # classifier_metrics: n, positives, TP, FP over the block
            mask, _, _, t = mine[b]
            system.add([(0, atoms(mask), 1.0)], t["n"])
            system.add(positives(b, everything), t["pos"])
            system.add([(fam[("tp", b)], atoms(mask), 1.0)], t["tp"])
            system.add([(fam[("fp", b)], atoms(mask), 1.0)], t["fp"])
    for b, m, r in rows:
        if r.get("n_images") is not None and (counts == "view" or b in mine):  # image counts: every finding's rows
            where = view.source[b[1]] if counts == "view" else view.blocks[b][0]  # (a block's: its finding's atoms only)
            system.add([(0, atoms(m & where), 1.0)], r["n_images"])
        if b not in mine:
            continue
        mask = mine[b][0]
        if r.get("n_pos") is not None:
            system.add(positives(b, m), r["n_pos"])
        rest = ~m
        for side, tpr, fpr in ((m, r.get("tpr"), r.get("fpr")), (rest, _rest(r, "tpr"), _rest(r, "fpr"))):
            if tpr is not None:  # TP - tpr x positives = 0 (the rest's TPR: the group's minus its gap)
                pos = [(o, v, -tpr * c) for o, v, c in positives(b, side)]
                system.add([(fam[("tp", b)], atoms(side & mask), 1.0), *pos], 0.0)
            if fpr is not None:  # FP - fpr x (labelled - positives) = 0
                neg = [(0, atoms(side & mask), -fpr)] + [(o, v, fpr * c) for o, v, c in positives(b, side)]
                system.add([(fam[("fp", b)], atoms(side & mask), 1.0), *neg], 0.0)
    if not system.rows:
        return []
    regions = {k: atoms(mask).astype(bool) for k, (mask, _) in view.regions(slug).items()}
    first = np.unique(atom, return_index=True)[1]
    atom_attrs = {a: v[first] for a, v in view.attrs.items()}
    inc = np.zeros((A, view.n_patients), np.float32)
    inc[atom, view.pcode] = 1.0
    labelled = np.any([b[0] for b in mine.values()], axis=0)
    uncertain = np.any([b[1] for b in mine.values()], axis=0)
    families = [("images", 0, np.ones(A, bool))]
    for key, offset in fam.items():
        if key == "images":
            continue
        if key[0] == "pos":
            domain = atoms(labelled & view.source[key[1]] & ~uncertain).astype(bool)
            families.append((f"positives {slug} ({key[1]})", offset, domain))
        else:
            families.append((f"{key[0]} {slug} ({key[1][1]}, {key[1][2]})", offset, atoms(mine[key[1]][0]).astype(bool)))
    return _search(system, atom_attrs, regions, families, lambda s: (s @ inc > 0).sum(1), min_patients, first_only)
