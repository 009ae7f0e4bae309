"""Tests for micle_tf.evaluation.knn with hand-computed expectations."""
import numpy as np
import pytest

from micle_tf.evaluation.knn import knn_accuracy, knn_classify, same_case_retrieval

# Bank of 4 points (cosine similarity only depends on direction):
#   b0 (1, 0) label 0 ; b1 (1, 1) label 0 ; b2 (0, 1) label 1 ; b3 (-1, 0) label 1
BANK = np.array([[1., 0.], [1., 1.], [0., 1.], [-1., 0.]])
BANK_Y = np.array([0, 0, 1, 1])
# q0 = (1, .2):  cos b0 .981, b1 .832, b2 .196, b3 -.981
# q1 = (.1, 1):  cos b2 .995, b1 .774, b0 .0995, b3 -.0995
# q2 = (.6, 1):  cos b1 .970, b2 .857, b0 .514, b3 -.514
Q = np.array([[1., .2], [.1, 1.], [.6, 1.]])


def test_knn_hand_example_majority():
    assert list(knn_classify(BANK, BANK_Y, Q, k=1)) == [0, 1, 0]
    # k=3: q0 -> b0,b1,b2 = 0,0,1 -> 0 ; q1 -> b2,b1,b0 = 1,0,0 -> 0 ; q2 -> b1,b2,b0 -> 0
    assert list(knn_classify(BANK, BANK_Y, Q, k=3)) == [0, 0, 0]
    # k=2 on q2: b1 (0) and b2 (1) tie 1-1 -> class with larger summed similarity (b1 .970) -> 0
    # k=2 on q1: b2 (1) and b1 (0) tie -> b2 .995 wins -> 1
    assert list(knn_classify(BANK, BANK_Y, Q, k=2)) == [0, 1, 0]


def test_knn_softmax_weighting_differs_from_majority():
    # q1, k=3: exp(.995/.07) > exp(.774/.07) + exp(.0995/.07) -> class 1
    assert knn_classify(BANK, BANK_Y, Q[1:2], k=3, weighting="softmax", temperature=0.07)[0] == 1
    assert knn_classify(BANK, BANK_Y, Q[1:2], k=3, weighting="majority")[0] == 0


def test_knn_accuracy_and_k_clipping():
    assert knn_accuracy(BANK, BANK_Y, Q, np.array([0, 1, 1]), k=1) == pytest.approx(2 / 3)
    # k larger than the bank is clipped to 4: every query sees 2 + 2 votes -> similarity tie-break
    assert knn_classify(BANK, BANK_Y, Q, k=50).shape == (3,)


def test_knn_leave_one_out_and_validation():
    rng = np.random.default_rng(0)
    centers = np.eye(3) * 5
    y = np.repeat([0, 1, 2], 10)
    emb = centers[y] + rng.normal(scale=.3, size=(30, 3))
    assert knn_accuracy(emb, y, emb, y, k=5, exclude_self=True) == 1.0
    # without exclude_self each point finds itself first
    assert list(knn_classify(emb, y, emb, k=1)) == list(y)
    with pytest.raises(ValueError, match="unlabelled"):
        knn_classify(BANK, np.array([0, -1, 1, 1]), Q)
    with pytest.raises(ValueError, match="k must"):
        knn_classify(BANK, BANK_Y, Q, k=0)


def test_same_case_retrieval_clustered_is_perfect():
    # cases A (3 points) and B (2 points), well separated
    emb = np.array([[1, .01, 0], [1, -.02, 0], [1, 0, .03], [0, 1, .01], [.02, 1, 0]])
    ids = ["A", "A", "A", "B", "B"]
    r = same_case_retrieval(emb, ids, k=1)
    assert r["precision_at_k"] == 1.0 and r["top1_hit_rate"] == 1.0
    # chance: A queries 2/4 each (x3), B queries 1/4 each (x2) -> (1.5 + .5) / 5 = .4
    assert r["chance"] == pytest.approx(0.4)
    assert r["k"] == 1 and r["num_queries"] == 5


def test_same_case_retrieval_with_singleton_and_k2():
    emb = np.array([[1, .01, 0], [1, -.02, 0], [1, 0, .03],
                    [0, 1, .01], [.02, 1, 0],
                    [0, 0, 1]])
    ids = np.array([1, 1, 1, 2, 2, 3])
    r1 = same_case_retrieval(emb, ids, k=1)
    # the singleton case 3 can never hit: 5/6
    assert r1["precision_at_k"] == pytest.approx(5 / 6)
    assert r1["top1_hit_rate"] == pytest.approx(5 / 6)
    # chance: 3 x 2/5 + 2 x 1/5 + 0 = 8/5 over 6 queries
    assert r1["chance"] == pytest.approx(8 / 30)
    r2 = same_case_retrieval(emb, ids, k=2)
    # k=2: A queries 2/2, B queries 1/2, singleton 0 -> (3 + 1 + 0) / 6
    assert r2["precision_at_k"] == pytest.approx(4 / 6)
    assert r2["top1_hit_rate"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        same_case_retrieval(emb, ids, k=6)


def test_same_case_retrieval_random_is_near_chance():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(50), 4)
    r = same_case_retrieval(rng.normal(size=(200, 32)), ids, k=3)
    assert r["chance"] == pytest.approx(3 / 199)
    assert r["precision_at_k"] < 0.08
