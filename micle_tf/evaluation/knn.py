"""Representation checks on frozen embeddings (pure numpy).

* ``knn_classify`` / ``knn_accuracy``: label-based check - cosine-similarity k-nearest-neighbour
  classification of query embeddings against a labelled bank.
* ``same_case_retrieval``: label-free check - do an embedding's nearest neighbours come from the
  same case (e.g. other patches/views of the same lesion)? This measures whether (MICLe)
  pretraining learned that images of one case belong together. It is the legacy summary of
  ``retrieval.retrieval_scores``; ``retrieval.same_case_retrieval_report`` is the full report
  (mAP, chance levels, case-bootstrap CIs, single-image cases excluded).

Similarities are computed in chunks of queries, so memory is ``O(chunk * bank)``.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from micle_tf.evaluation import retrieval
from micle_tf.evaluation.retrieval import _l2_normalize

_CHUNK = 1024


def _top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of the k largest entries per row, most similar first."""
    n = sim.shape[1]
    if k < n:
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (sim.shape[0], n))
    vals = np.take_along_axis(sim, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def knn_classify(train_emb, train_labels, query_emb, k: int = 20, temperature: float = 0.07,
                 weighting: str = "majority", exclude_self: bool = False,
                 num_classes: int | None = None) -> np.ndarray:
    """Cosine-similarity kNN classification -> predicted labels ``[Q]`` (int).

    Embeddings are L2-normalised; the ``k`` most similar bank rows vote (``k`` is clipped to the
    bank size).

    * ``weighting="majority"`` (default): one vote per neighbour; ties between classes go to the
      class with the larger summed similarity among its voters, then to the lower class index.
    * ``weighting="softmax"``: each neighbour votes ``exp(sim / temperature)`` (the weighted
      kNN monitor of Wu et al. 2018 used in SimCLR-style work); ties go to the lower index.

    ``exclude_self=True`` is for leave-one-out use when ``query_emb`` IS the bank (same rows,
    same order): a query's own row is never its neighbour.
    ``train_labels`` are multiclass ints ``>= 0``; negative (unlabelled) values are an error.
    """
    if weighting not in ("majority", "softmax"):
        raise ValueError(f"weighting must be 'majority' or 'softmax', got {weighting!r}")
    bank = _l2_normalize(train_emb)
    query = _l2_normalize(query_emb)
    labels = np.asarray(train_labels).astype(np.int64)
    if labels.shape != (bank.shape[0],):
        raise ValueError(f"train_labels shape {labels.shape} for {bank.shape[0]} embeddings")
    if np.any(labels < 0):
        raise ValueError("train_labels contain negative (unlabelled) values; filter them first")
    if bank.shape[1] != query.shape[1]:
        raise ValueError(f"embedding dims differ: {bank.shape[1]} vs {query.shape[1]}")
    if exclude_self and query.shape[0] != bank.shape[0]:
        raise ValueError("exclude_self=True needs query_emb to be the bank itself")
    if k < 1:
        raise ValueError("k must be >= 1")
    n_bank = bank.shape[0] - (1 if exclude_self else 0)
    if n_bank < 1:
        raise ValueError("empty neighbour bank")
    k = min(k, n_bank)
    c = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    preds = np.empty(query.shape[0], dtype=np.int64)
    for s in range(0, query.shape[0], _CHUNK):
        sim = query[s:s + _CHUNK] @ bank.T
        if exclude_self:
            rows = np.arange(sim.shape[0])
            sim[rows, s + rows] = -np.inf
        idx = _top_k(sim, k)
        nb_sim = np.take_along_axis(sim, idx, axis=1)
        nb_lab = labels[idx]
        onehot = np.zeros((sim.shape[0], k, c))
        np.put_along_axis(onehot, nb_lab[:, :, None], 1.0, axis=2)
        if weighting == "majority":
            votes = onehot.sum(axis=1)
            simsum = np.einsum("qk,qkc->qc", nb_sim, onehot)
            best = votes == votes.max(axis=1, keepdims=True)
            score = np.where(best, simsum, -np.inf)
            preds[s:s + sim.shape[0]] = np.argmax(score, axis=1)
        else:
            w = np.exp((nb_sim - nb_sim[:, :1]) / temperature)   # shift for stability
            preds[s:s + sim.shape[0]] = np.argmax(np.einsum("qk,qkc->qc", w, onehot), axis=1)
    return preds


def knn_accuracy(train_emb, train_labels, query_emb, query_labels, k: int = 20,
                 temperature: float = 0.07, weighting: str = "majority",
                 exclude_self: bool = False) -> float:
    """Fraction of queries whose kNN prediction (``knn_classify``) equals ``query_labels``."""
    query_labels = np.asarray(query_labels).astype(np.int64)
    if np.any(query_labels < 0):
        raise ValueError("query_labels contain negative (unlabelled) values; filter them first")
    pred = knn_classify(train_emb, train_labels, query_emb, k=k, temperature=temperature,
                        weighting=weighting, exclude_self=exclude_self)
    if pred.shape != query_labels.shape:
        raise ValueError(f"query_labels shape {query_labels.shape} for {pred.shape[0]} queries")
    return float(np.mean(pred == query_labels))


def same_case_retrieval(embeddings, case_ids, k: int = 1, pixel_hashes=None) -> Dict[str, Any]:
    """Same-case retrieval among all embeddings (cosine similarity, each query excludes itself),
    in the legacy convention where every image is a query.

    Returns ``{"precision_at_k", "top1_hit_rate", "k", "num_queries", "chance"}``:

    * ``precision_at_k``: mean over queries of the fraction of its ``k`` nearest other
      embeddings that share its case id;
    * ``top1_hit_rate``: fraction of queries whose single nearest other embedding is same-case;
    * ``chance``: expected precision for random neighbours, the mean over queries of
      ``(same-case others) / (all others)``.

    Every embedding is a query; one from a single-image case scores 0 in both precision and
    chance. Needs ``1 <= k <= N - 1``. The ranking (ties broken by image index, optional
    ``pixel_hashes`` duplicate check) is ``retrieval.retrieval_scores``; for the honest report
    that excludes single-image cases, adds mAP, chance levels and case-bootstrap CIs, use
    ``retrieval.same_case_retrieval_report``.
    """
    s = retrieval.retrieval_scores(embeddings, case_ids, pixel_hashes=pixel_hashes, k=k)
    n = s["num_images"]
    chance = float(np.sum(s["num_relevant"] / s["num_candidates"]) / n)
    return {"precision_at_k": float(np.sum(s["precision_at_k"]) / n),
            "top1_hit_rate": float(np.sum(s["top1"]) / n),
            "k": int(k), "num_queries": int(n), "chance": chance}
