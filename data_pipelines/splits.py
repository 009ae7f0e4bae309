"""Patient-level splits: whole cases go to one split, stratified by label, reproducible by seed.

Images of one patient are strongly correlated; a split by image leaks the patient into both
train and test and inflates every metric. Everything here therefore works on case ids, and
`check_disjoint` proves the property wherever splits meet (writer, evaluator).
"""
import collections
import math

import numpy as np

DEFAULT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


def stratum_of(label):
    """Stratification key: the class for multiclass, the positive set for multilabel
    (rare combinations end up in small strata, which the allocator handles), None if unlabelled."""
    if label is None:
        return None
    if isinstance(label, (list, tuple, np.ndarray)):
        return tuple(int(v == 1) for v in label)
    return int(label)


def _allocate(n, fractions):
    """Largest-remainder split of n items into len(fractions) counts that sum to n."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_cases(case_ids, labels=None, fractions=DEFAULT_FRACTIONS, seed=0):
    """Assigns every case id to one split. Returns {split_name: [case_id, ...]}.

    `labels[i]` belongs to `case_ids[i]` (int, multilabel code list, or None); cases are
    stratified by `stratum_of(label)`. Rounding remainders are assigned across strata so that
    split sizes follow the fractions globally, not just within each stratum."""
    case_ids = list(case_ids)
    if len(set(case_ids)) != len(case_ids):
        dup = [c for c, k in collections.Counter(case_ids).items() if k > 1][:5]
        raise ValueError(f"duplicate case ids given to split_cases: {dup}")
    names = [name for name, _ in fractions]
    weights = np.array([f for _, f in fractions], dtype=np.float64)
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"invalid split fractions {fractions}")
    weights = weights / weights.sum()
    labels = list(labels) if labels is not None else [None] * len(case_ids)
    strata = collections.defaultdict(list)
    for cid, lab in zip(case_ids, labels):
        strata[stratum_of(lab)].append(cid)
    rng = np.random.default_rng(seed)
    out = {name: [] for name in names}
    targets = _allocate(len(case_ids), list(weights))
    # Each stratum gets its floor share; leftovers go where the global target is still unmet.
    leftovers = []
    for key in sorted(strata, key=repr):
        members = sorted(strata[key])
        rng.shuffle(members)
        counts = [math.floor(len(members) * w) for w in weights]
        start = 0
        for name, c in zip(names, counts):
            out[name].extend(members[start:start + c])
            start += c
        leftovers.extend(members[start:])
    for cid in leftovers:
        deficit = [targets[i] - len(out[n]) for i, n in enumerate(names)]
        out[names[int(np.argmax(deficit))]].append(cid)
    check_disjoint(out)
    return out


def split_groups(groups, labels=None, fractions=DEFAULT_FRACTIONS, seed=0):
    """`split_cases` for groups of cases that must share a split (cases holding the same image,
    `micle-data --duplicates=group`): each group is split as one unit, stratified by the label
    of its first case, then expanded. Split sizes follow the fractions in groups, so large
    groups make them coarser. `groups`: lists of case ids; `labels[i]` is group i's label."""
    groups = [list(g) for g in groups]
    if any(not g for g in groups):
        raise ValueError("empty group given to split_groups")
    leaders = [g[0] for g in groups]
    by_leader = dict(zip(leaders, groups))
    assignment = split_cases(leaders, labels, fractions=fractions, seed=seed)
    out = {name: sorted(c for leader in ids for c in by_leader[leader])
           for name, ids in assignment.items()}
    check_disjoint(out)
    return out


def label_fraction_subset(case_ids, labels, fraction, seed=0):
    """The cases used for a label-efficiency run: `fraction` of the labelled cases, stratified.

    Same (cases, fraction, seed) -> same subset, and with one seed a smaller fraction's subset is
    contained in a larger one's (each stratum is ranked once and the first ceil(f*n) are taken),
    so a sweep over fractions adds labels instead of redrawing them. Every stratum keeps at least
    one case when fraction > 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    strata = collections.defaultdict(list)
    for cid, lab in zip(case_ids, labels):
        if lab is None:
            continue
        strata[stratum_of(lab)].append(cid)
    rng = np.random.default_rng(seed)
    chosen = []
    for key in sorted(strata, key=repr):
        members = sorted(strata[key])
        rng.shuffle(members)
        chosen.extend(members[: max(1, math.ceil(fraction * len(members)))])
    return sorted(chosen)


def check_disjoint(split_to_case_ids):
    """Raises ValueError naming the overlapping case ids if any case is in two splits."""
    seen = {}
    overlaps = []
    for split, ids in split_to_case_ids.items():
        for cid in set(ids):
            if cid in seen and seen[cid] != split:
                overlaps.append((cid, seen[cid], split))
            seen.setdefault(cid, split)
    if overlaps:
        shown = ", ".join(f"{c} in {a} and {b}" for c, a, b in overlaps[:10])
        raise ValueError(f"{len(overlaps)} case(s) appear in more than one split: {shown}")
    return True
