"""Same-case retrieval (micle_tf.evaluation.retrieval) against hand-computed values and a
plain-Python reference."""
import itertools
import math

import numpy as np
import pytest

from micle_tf.evaluation import retrieval
from micle_tf.evaluation.retrieval import (expected_random_ap, paired_retrieval_difference,
                                           retrieval_scores, same_case_retrieval_report)


def unit(deg):
    return np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], axis=1)


# Six 2-D unit vectors; cosine similarity falls with the angular distance.
#   image: 0    1    2    3     4    5
#   angle: 0    10   50   105   60   215
#   case : A    A    B    A     B    C (single image)
ANGLES = np.array([0., 10., 50., 105., 60., 215.])
CASES = np.array(["A", "A", "B", "A", "B", "C"])
# Rankings by angular distance (relevant = same case, marked *):
#   q0 (A): 1* (10), 2 (50), 4 (60), 3* (105), 5 (145)   -> top1 1, AP (1/1 + 2/4)/2 = 0.75
#   q1 (A): 0* (10), 2 (40), 4 (50), 3* (95),  5 (155)   -> top1 1, AP 0.75
#   q2 (B): 4* (10), 1 (40), 0 (50), 3 (55),   5 (165)   -> top1 1, AP 1
#   q3 (A): 4 (45),  2 (55), 1* (95), 0* (105), 5 (110)  -> top1 0, AP (1/3 + 2/4)/2 = 5/12
#   q4 (B): 2* (10), 3 (45), 1 (50), 0 (60),   5 (155)   -> top1 1, AP 1
#   q5 (C): no other image of its case -> excluded
# top1 = 4/5 = 0.8 ; mAP = (0.75 + 0.75 + 1 + 5/12 + 1)/5 = (47/12)/5 = 47/60
# chance_top1 (5 candidates): A queries 2/5 (x3), B queries 1/5 (x2) -> (6/5 + 2/5)/5 = 8/25
EXPECTED_TOP1 = [1., 1., 1., 0., 1.]
EXPECTED_AP = [0.75, 0.75, 1.0, 5 / 12, 1.0]


def test_hand_built_angles():
    s = retrieval_scores(unit(ANGLES), CASES)
    np.testing.assert_array_equal(s["query_index"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(s["case_of_query"], ["A", "A", "B", "A", "B"])
    np.testing.assert_array_equal(s["top1"], EXPECTED_TOP1)
    np.testing.assert_allclose(s["average_precision"], EXPECTED_AP, rtol=1e-12)
    np.testing.assert_array_equal(s["num_relevant"], [2, 2, 1, 2, 1])
    assert s["num_single_image_queries"] == 1 and s["num_candidates"] == 5
    assert not s["tied_top1"].any()
    r = same_case_retrieval_report(unit(ANGLES), CASES, n_boot=200)
    assert r["top1"] == pytest.approx(0.8)
    assert r["map"] == pytest.approx(47 / 60)
    assert r["chance_top1"] == pytest.approx(8 / 25)
    assert r["num_queries"] == 5 and r["num_cases"] == 2 and r["num_images"] == 6
    assert r["num_single_image_queries"] == 1 and r["num_tied_top1"] == 0
    # the embedding scale does not matter (cosine similarity)
    scaled = unit(ANGLES) * np.array([[3.], [0.5], [2.], [7.], [1.], [10.]])
    np.testing.assert_allclose(retrieval_scores(scaled, CASES)["average_precision"],
                               EXPECTED_AP, rtol=1e-12)


def test_precision_at_k_and_legacy_knn_wrapper():
    s = retrieval_scores(unit(ANGLES), CASES, k=2)
    # top-2 same-case fractions: q0 {1*,2} 1/2, q1 {0*,2} 1/2, q2 {4*,1} 1/2, q3 {4,2} 0,
    # q4 {2*,3} 1/2
    np.testing.assert_allclose(s["precision_at_k"], [.5, .5, .5, 0., .5])
    from micle_tf.evaluation.knn import same_case_retrieval
    legacy = same_case_retrieval(unit(ANGLES), CASES, k=2)
    # legacy convention: the single-image query counts, with score 0 -> sums over 6 queries
    assert legacy["precision_at_k"] == pytest.approx(2.0 / 6)
    assert legacy["top1_hit_rate"] == pytest.approx(4 / 6)
    assert legacy["chance"] == pytest.approx(8 / 5 / 6)


def test_ties_go_to_the_lower_index():
    # q0 = (1, 0) has two candidates at exactly the same similarity 0: (0, 1) and (0, -1).
    x, y, neg_y = [1., 0.], [0., 1.], [0., -1.]
    # order 1: image 1 is the other case -> q0 misses at rank 1, same-case at rank 2
    s = retrieval_scores(np.array([x, y, neg_y]), ["X", "Y", "X"])
    np.testing.assert_array_equal(s["query_index"], [0, 2])
    # q0: 1 (sim 0, Y), 2 (sim 0, X*) -> top1 0, AP 1/2 ; q2: 0* (sim 0), 1 (sim -1) -> 1, 1
    np.testing.assert_array_equal(s["top1"], [0., 1.])
    np.testing.assert_allclose(s["average_precision"], [0.5, 1.0])
    np.testing.assert_array_equal(s["tied_top1"], [True, False])
    # swapping images 1 and 2 swaps the tie-break: q0 now hits at rank 1
    s = retrieval_scores(np.array([x, neg_y, y]), ["X", "X", "Y"])
    np.testing.assert_array_equal(s["top1"], [1., 1.])
    np.testing.assert_allclose(s["average_precision"], [1.0, 1.0])
    assert same_case_retrieval_report(np.array([x, neg_y, y]), ["X", "X", "Y"],
                                      n_boot=0)["num_tied_top1"] == 1


def _reference(emb, cases):
    """Plain-Python reference: sort the other images by (-cosine, index) for every query."""
    emb = np.asarray(emb, np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    top1, aps = [], []
    for i in range(len(emb)):
        others = [j for j in range(len(emb)) if j != i]
        rel_total = sum(cases[j] == cases[i] for j in others)
        if rel_total == 0:
            continue
        ranked = sorted(others, key=lambda j: (-float(emb[i] @ emb[j]), j))
        hits, ap = 0, 0.0
        for pos, j in enumerate(ranked, 1):
            if cases[j] == cases[i]:
                hits += 1
                ap += hits / pos
        top1.append(float(cases[ranked[0]] == cases[i]))
        aps.append(ap / rel_total)
    return np.array(top1), np.array(aps)


@pytest.mark.parametrize("quantize", [False, True])
def test_matches_reference_and_is_chunk_independent(monkeypatch, quantize):
    rng = np.random.default_rng(3)
    cases = rng.integers(0, 12, size=60)
    emb = rng.normal(size=(60, 4))
    if quantize:  # coarse values give many exact ties
        emb = np.sign(emb)
    want_top1, want_ap = _reference(emb, cases)
    full = retrieval_scores(emb, cases)
    np.testing.assert_array_equal(full["top1"], want_top1)
    np.testing.assert_allclose(full["average_precision"], want_ap, rtol=1e-12)
    monkeypatch.setattr(retrieval, "_MAX_BLOCK_ENTRIES", 7 * 60)   # chunks of 7 queries
    chunked = retrieval_scores(emb, cases)
    np.testing.assert_array_equal(chunked["top1"], full["top1"])
    np.testing.assert_array_equal(chunked["average_precision"], full["average_precision"])
    np.testing.assert_array_equal(chunked["tied_top1"], full["tied_top1"])


def _brute_force_expected_ap(r, m):
    aps = []
    for perm in itertools.permutations(range(m)):
        rel = [p < r for p in perm]          # items 0..r-1 are the relevant ones
        hits, ap = 0, 0.0
        for pos, is_rel in enumerate(rel, 1):
            if is_rel:
                hits += 1
                ap += hits / pos
        aps.append(ap / r)
    return float(np.mean(aps))


def test_chance_map_is_exact():
    for m in range(1, 7):
        for r in range(1, m + 1):
            assert expected_random_ap(r, m) == pytest.approx(_brute_force_expected_ap(r, m),
                                                             rel=1e-12), (r, m)
    # R = 1 is the mean reciprocal rank 1/M sum 1/p; R = M gives AP 1
    assert expected_random_ap(1, 4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert expected_random_ap(5, 5) == pytest.approx(1.0)
    # the report's chance_map: mean over the 5 queries of the hand-built example (M = 5)
    r = same_case_retrieval_report(unit(ANGLES), CASES, n_boot=0)
    want = (3 * _brute_force_expected_ap(2, 5) + 2 * _brute_force_expected_ap(1, 5)) / 5
    assert r["chance_map"] == pytest.approx(want, rel=1e-12)
    assert r["ci95"] == {}


def test_random_embeddings_score_near_chance():
    rng = np.random.default_rng(0)
    cases = np.repeat(np.arange(40), 3)
    r = same_case_retrieval_report(rng.normal(size=(120, 64)), cases, n_boot=300)
    assert r["chance_top1"] == pytest.approx(2 / 119)
    assert abs(r["map"] - r["chance_map"]) < 0.05 and r["top1"] < 0.08


def test_bootstrap_ci_contains_estimate_and_collapses_when_scores_are_equal():
    rng = np.random.default_rng(1)
    cases = np.repeat(np.arange(30), 4)
    emb = rng.normal(size=(30, 8))[cases] + rng.normal(scale=1.5, size=(120, 8))
    r = same_case_retrieval_report(emb, cases, n_boot=500, seed=2)
    for m in ("top1", "map"):
        lo, hi = r["ci95"][m]
        assert lo <= r[m] <= hi and lo < hi
    again = same_case_retrieval_report(emb, cases, n_boot=500, seed=2)
    assert again["ci95"] == r["ci95"]                       # deterministic given the seed
    # well-separated cases of different sizes: every query scores 1 -> every resample is 1
    sizes = [2, 3, 5, 2]
    cases = np.repeat(np.arange(4), sizes)
    emb = np.eye(4)[cases] + 1e-3 * rng.normal(size=(len(cases), 4))
    r = same_case_retrieval_report(emb, cases, n_boot=200)
    assert r["top1"] == 1.0 and r["map"] == 1.0
    assert r["ci95"] == {"top1": [1.0, 1.0], "map": [1.0, 1.0]}


def test_bootstrap_resamples_cases_not_queries():
    # case 0 has 4 queries scoring 1; case 1 has 2 queries scoring 0 (by construction below).
    # Resampling the 2 cases: {0,0} -> 1, {1,1} -> 0, {0,1} -> 4/6: only these three values.
    scores = {"top1": np.array([1., 1., 1., 1., 0., 0.]),
              "average_precision": np.array([1., 1., 1., 1., 0., 0.]),
              "case_of_query": np.array([0, 0, 0, 0, 1, 1]),
              "num_relevant": np.array([3, 3, 3, 3, 1, 1]), "num_candidates": 5,
              "tied_top1": np.zeros(6, bool), "num_images": 6, "num_single_image_queries": 0}
    samples = retrieval._case_bootstrap({"top1": scores["top1"]}, scores["case_of_query"],
                                        400, 0)["top1"]
    assert set(np.round(samples, 12)) == {0.0, 1.0, round(4 / 6, 12)}
    assert retrieval.summarize(scores, n_boot=10)["top1"] == pytest.approx(4 / 6)


def test_paired_difference():
    rng = np.random.default_rng(4)
    cases = np.repeat(np.arange(25), 3)
    good = rng.normal(size=(25, 6))[cases] + 0.3 * rng.normal(size=(75, 6))
    bad = rng.normal(size=(75, 6))
    same = paired_retrieval_difference(good, good.copy(), cases, n_boot=300)
    for m in ("top1", "map"):
        assert same[m]["difference"] == 0.0 and same[m]["ci95"] == [0.0, 0.0]
        assert same[m]["fraction_resamples_diff_le_0"] == 1.0
    d = paired_retrieval_difference(good, bad, cases, n_boot=300, seed=1)
    ra = same_case_retrieval_report(good, cases, n_boot=0)
    rb = same_case_retrieval_report(bad, cases, n_boot=0)
    assert d["map"]["difference"] == pytest.approx(ra["map"] - rb["map"])
    assert d["top1"]["value_a"] == pytest.approx(ra["top1"])
    lo, hi = d["map"]["ci95"]
    assert 0 < lo <= d["map"]["difference"] <= hi
    assert d["map"]["fraction_resamples_diff_le_0"] == 0.0
    assert d["num_queries"] == 75 and d["num_cases"] == 25 and d["n_boot"] == 300
    # score dicts work too, and give the same numbers
    d2 = paired_retrieval_difference(retrieval_scores(good, cases), retrieval_scores(bad, cases),
                                     n_boot=300, seed=1)
    assert d2["map"] == d["map"]
    # mismatched images / case ids are refused
    other = cases.copy()
    other[[0, 3]] = other[[3, 0]]
    with pytest.raises(ValueError, match="different images or case ids"):
        paired_retrieval_difference(retrieval_scores(good, cases),
                                    retrieval_scores(bad, other))
    with pytest.raises(ValueError, match="case_ids_b differ"):
        paired_retrieval_difference(good, bad, cases, case_ids_b=other)
    with pytest.raises(ValueError, match="same images"):
        paired_retrieval_difference(good, bad[:-1], cases)


def test_duplicate_pixel_hashes_raise():
    emb = unit(ANGLES)
    hashes = ["h0", "h1", "h2", "h3", "h4", "h5"]
    retrieval_scores(emb, CASES, pixel_hashes=hashes)     # all distinct: fine
    dup = ["h0", "h1", "h2", "h1", "h4", "h0"]
    with pytest.raises(ValueError) as e:
        same_case_retrieval_report(emb, CASES, pixel_hashes=dup)
    msg = str(e.value)
    assert "2 pixel hash(es)" in msg and "2 duplicate image(s)" in msg
    assert "images 1 and 3" in msg and "'A' and 'A'" in msg   # first repeat: h1 at 1 and 3
    with pytest.raises(ValueError, match="pixel hashes for"):
        retrieval_scores(emb, CASES, pixel_hashes=hashes[:3])


def test_input_validation_and_degenerate_sets():
    with pytest.raises(ValueError, match="case_ids shape"):
        retrieval_scores(unit(ANGLES), CASES[:3])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_scores(np.array([[np.nan, 1.], [1., 0.]]), [0, 0])
    # every case has a single image: nothing to score
    r = same_case_retrieval_report(unit(ANGLES), np.arange(6), n_boot=50)
    assert r["num_queries"] == 0 and r["top1"] is None and r["map"] is None
    assert r["num_single_image_queries"] == 6
    assert r["ci95"] == {"top1": [None, None], "map": [None, None]}
    assert math.isclose(expected_random_ap(1, 1), 1.0)
