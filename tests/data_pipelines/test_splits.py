import collections

import pytest

from data_pipelines import splits

IDS = [f"case{i:03d}" for i in range(200)]
LABELS = [0] * 120 + [1] * 50 + [2] * 30


def test_split_is_a_partition_with_requested_sizes():
    out = splits.split_cases(IDS, LABELS, seed=3)
    assert sorted(sum(out.values(), [])) == sorted(IDS)
    assert [len(out[k]) for k in ("train", "val", "test")] == [140, 30, 30]
    splits.check_disjoint(out)


def test_split_is_stratified():
    out = splits.split_cases(IDS, LABELS, seed=3)
    label_of = dict(zip(IDS, LABELS))
    for name, frac in splits.DEFAULT_FRACTIONS:
        counts = collections.Counter(label_of[c] for c in out[name])
        for cls, total in collections.Counter(LABELS).items():
            assert abs(counts[cls] - frac * total) <= 1.0, (name, cls, counts)


def test_split_is_reproducible_and_seed_dependent():
    a = splits.split_cases(IDS, LABELS, seed=1)
    assert a == splits.split_cases(list(reversed(IDS)), list(reversed(LABELS)), seed=1)
    assert a != splits.split_cases(IDS, LABELS, seed=2)


def test_split_unlabelled_and_multilabel():
    out = splits.split_cases(IDS[:20], None, seed=0)
    assert sum(map(len, out.values())) == 20
    ml = [[1, 0], [0, 1], [1, -1], [-2, 1]] * 5
    out = splits.split_cases(IDS[:20], ml, seed=0)
    assert sorted(sum(out.values(), [])) == sorted(IDS[:20])


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        splits.split_cases(["a", "a"], [0, 0])


def test_check_disjoint_names_overlap():
    with pytest.raises(ValueError, match="case7 in train and test"):
        splits.check_disjoint({"train": ["case1", "case7"], "test": ["case7"]})


def test_label_fraction_by_case_nested_stratified_reproducible():
    sub10 = splits.label_fraction_subset(IDS, LABELS, 0.1, seed=5)
    sub50 = splits.label_fraction_subset(IDS, LABELS, 0.5, seed=5)
    assert set(sub10) <= set(sub50)
    assert sub10 == splits.label_fraction_subset(IDS, LABELS, 0.1, seed=5)
    assert sub10 != splits.label_fraction_subset(IDS, LABELS, 0.1, seed=6)
    label_of = dict(zip(IDS, LABELS))
    assert collections.Counter(label_of[c] for c in sub10) == {0: 12, 1: 5, 2: 3}
    assert len(splits.label_fraction_subset(IDS, LABELS, 1.0)) == 200
    # every class keeps at least one case even at a tiny fraction
    assert {label_of[c] for c in splits.label_fraction_subset(IDS, LABELS, 0.001)} == {0, 1, 2}


def test_label_fraction_skips_unlabelled_and_checks_range():
    sub = splits.label_fraction_subset(["a", "b", "c"], [0, None, 1], 1.0)
    assert sub == ["a", "c"]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            splits.label_fraction_subset(["a"], [0], bad)
