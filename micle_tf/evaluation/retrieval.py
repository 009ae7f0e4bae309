"""Same-case retrieval on frozen embeddings: top-1, mean average precision, chance levels and
case-bootstrap confidence intervals (pure numpy).

The question it answers, label-free: among the images of held-out cases, are an image's nearest
neighbours the OTHER images of its own case (other patches / views of the same lesion or
patient)? That is what MICLe pretraining is meant to teach.

Protocol
--------
Every image is a query. Its candidates are all OTHER images (the query itself is never a
candidate), ranked by decreasing cosine similarity of the L2-normalised embeddings (float64).
The relevant candidates are the images of the query's case.

* ``top1``: 1 if the highest-ranked candidate is from the query's case, else 0.
* ``average_precision``: AP of the ranking with the same-case images as relevant,
  ``AP = (1/R) * sum_{k=1..R} k / rank_k`` where ``rank_k`` (1-based) is the position of the
  k-th relevant candidate and ``R`` the number of other images of the query's case.
* A query whose case has no other image (``R == 0``) has nothing to retrieve: it is excluded
  from every score and chance level and counted in ``num_single_image_queries`` (it still is a
  candidate - a distractor - for the other queries).

Tie-breaking (deterministic): candidates with exactly equal computed similarities are ranked by
increasing image index (a stable sort on ``-similarity``). Beware that this order is not neutral
when images of a case are stored next to each other: for a collapsed encoder (all embeddings
equal, or all zero) every ranking is a tie and the index order puts a neighbouring, often
same-case, image first. ``num_tied_top1`` counts the queries whose first candidate's similarity
equals the second's, i.e. whose top-1 was decided by the index order; it should be ~0 for a real
encoder.

Exact duplicates must be absent
-------------------------------
If an image occurs twice (the same pixels under two ids, or twice within one case), the copy is
its nearest neighbour for ANY encoder (similarity exactly 1), so a random encoder "retrieves" it:
on the old PH² records, whose patches had exact copies, a randomly initialised encoder scored a
same-case top-1 of 0.78. Pass ``pixel_hashes`` (one hash of the decoded pixels per image) and a
repeated hash raises ``ValueError``.

Chance levels (random ranking of the candidates)
-----------------------------------------------
For a query with ``R`` relevant among ``M = N - 1`` candidates:

* expected top-1 = ``R / M``;
* expected AP, exactly (not estimated): with ``rel_p`` the relevance at position ``p`` and
  ``C_p`` the number of relevant in the top ``p``,
  ``E[AP] = (1/R) sum_p E[rel_p C_p] / p`` and ``E[rel_p C_p] = (R/M) (1 + (p-1)(R-1)/(M-1))``,
  so ``E[AP] = (1/M) [H_M + (R-1)/(M-1) (M - H_M)]`` with ``H_M = sum_{p=1..M} 1/p``
  (``= 1`` when ``M == 1``). ``chance_map`` is its mean over the (non-single) queries.

Bootstrap
---------
The CIs resample CASES with replacement (the cases that contribute queries); every query of a
drawn case comes along and a case drawn twice counts twice. The rankings are NOT recomputed on the
resampled image set: the bootstrap is over the fixed per-query scores grouped by case, so it
captures case-to-case variability of the scores, not the change of the candidate pool. Intervals
are percentile intervals ``[q(alpha/2), q(1 - alpha/2)]``; deterministic given ``seed``.

Memory: similarities are computed for a chunk of queries at a time, ``O(chunk * N)``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from micle_tf.evaluation.metrics import _first_appearance_unique, _percentile_ci

__all__ = ["retrieval_scores", "summarize", "same_case_retrieval_report",
           "paired_retrieval_difference", "expected_random_ap", "check_no_duplicates"]


def _l2_normalize(x) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product); [N, D], finite."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# Queries per similarity chunk are chosen so that a [chunk, N] block stays around this many
# entries (the sort indices, similarities and relevance masks of a chunk: ~30 bytes per entry).
_MAX_BLOCK_ENTRIES = 4_000_000
_MAX_CHUNK = 1024
# Bootstrap resamples are drawn in chunks so that a [chunk, num_cases] count matrix stays small.
_MAX_BOOT_ENTRIES = 4_000_000
_METRICS = (("top1", "top1"), ("map", "average_precision"))


def check_no_duplicates(pixel_hashes, case_ids=None) -> None:
    """Raises ``ValueError`` if any pixel hash occurs more than once (see the module docstring
    for why exact duplicates make same-case retrieval meaningless)."""
    hashes = list(np.asarray(pixel_hashes, dtype=object).reshape(-1))
    first: Dict[Any, int] = {}
    dup_hashes, dup_images, example = set(), 0, None
    for i, h in enumerate(hashes):
        if h in first:
            dup_images += 1
            dup_hashes.add(h)
            if example is None:
                example = (first[h], i)
        else:
            first[h] = i
    if example is None:
        return
    a, b = example
    where = ""
    if case_ids is not None:
        ids = np.asarray(case_ids)
        where = f" (case ids {ids[a].tolist()!r} and {ids[b].tolist()!r})"
    raise ValueError(
        f"{len(dup_hashes)} pixel hash(es) occur more than once ({dup_images} duplicate "
        f"image(s) among {len(hashes)}), e.g. images {a} and {b}{where}. An exact copy is its "
        "own nearest neighbour for any encoder, which inflates same-case retrieval (a random "
        "encoder scored top-1 0.78 on records with copies): de-duplicate the images first.")


def expected_random_ap(num_relevant, num_candidates) -> np.ndarray:
    """Exact expected AP of a uniformly random ranking of ``num_candidates`` (M) items of which
    ``num_relevant`` (R >= 1) are relevant (formula in the module docstring). Vectorised."""
    r = np.asarray(num_relevant, dtype=np.float64)
    m = np.asarray(num_candidates, dtype=np.float64)
    if np.any(r < 1) or np.any(r > m):
        raise ValueError("need 1 <= num_relevant <= num_candidates")
    mi = m.astype(np.int64)
    harmonic = np.cumsum(1.0 / np.arange(1, int(mi.max()) + 1))[mi - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(m > 1, (r - 1) / (m - 1), 0.0)
    return (harmonic + slope * (m - harmonic)) / m


def retrieval_scores(embeddings, case_ids, pixel_hashes=None, k: Optional[int] = None
                     ) -> Dict[str, Any]:
    """Per-query same-case retrieval scores (protocol, tie-breaking and exclusions in the module
    docstring).

    Args:
      embeddings: ``[N, D]`` float embeddings (any scale: cosine similarity is used).
      case_ids: ``[N]`` case id per image.
      pixel_hashes: optional ``[N]`` hash of each image's pixels; a repeated hash raises.
      k: also return ``precision_at_k`` (fraction of the ``k`` highest-ranked candidates that are
        same-case), ``1 <= k <= N - 1``.

    Returns a dict of per-query arrays over the Q queries whose case has another image, in image
    order: ``top1`` (float 0/1), ``average_precision``, ``case_of_query`` (their case ids),
    ``query_index`` (their row in ``embeddings``), ``num_relevant`` (same-case candidates R),
    ``tied_top1`` (bool: top-1 decided by the index tie-break), ``precision_at_k`` (with ``k``);
    and the counts ``num_images`` (N), ``num_candidates`` (N - 1), ``num_single_image_queries``.
    """
    emb = _l2_normalize(embeddings)
    case_ids = np.asarray(case_ids)
    n = emb.shape[0]
    if case_ids.shape != (n,):
        raise ValueError(f"case_ids shape {case_ids.shape} for {n} embeddings")
    if n < 2:
        raise ValueError("need at least 2 embeddings")
    if k is not None and not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}], got {k}")
    if pixel_hashes is not None:
        if len(pixel_hashes) != n:
            raise ValueError(f"{len(pixel_hashes)} pixel hashes for {n} embeddings")
        check_no_duplicates(pixel_hashes, case_ids)
    _, inv = _first_appearance_unique(case_ids)
    counts = np.bincount(inv)
    queries = np.flatnonzero(counts[inv] > 1)
    q = len(queries)
    m = n - 1
    top1 = np.zeros(q)
    ap = np.zeros(q)
    tied = np.zeros(q, dtype=bool)
    prec_k = np.zeros(q) if k is not None else None
    positions = np.arange(1, m + 1, dtype=np.float64)
    chunk = max(1, min(_MAX_CHUNK, _MAX_BLOCK_ENTRIES // n))
    for s in range(0, q, chunk):
        rows = queries[s:s + chunk]
        sim = emb[rows] @ emb.T
        sim[np.arange(len(rows)), rows] = -np.inf      # the query itself: ranked last, dropped
        order = np.argsort(-sim, axis=1, kind="stable")[:, :m]
        rel = inv[order] == inv[rows][:, None]         # [c, M] relevance in ranked order
        hits = np.cumsum(rel, axis=1)
        r = hits[:, -1]
        ap[s:s + len(rows)] = np.sum(np.where(rel, hits / positions, 0.0), axis=1) / r
        top1[s:s + len(rows)] = rel[:, 0]
        if m > 1:
            best = np.take_along_axis(sim, order[:, :2], axis=1)
            tied[s:s + len(rows)] = best[:, 0] == best[:, 1]
        if prec_k is not None:
            prec_k[s:s + len(rows)] = hits[:, k - 1] / k
    out = {
        "top1": top1,
        "average_precision": ap,
        "case_of_query": case_ids[queries],
        "query_index": queries,
        "num_relevant": counts[inv[queries]] - 1,
        "tied_top1": tied,
        "num_images": int(n),
        "num_candidates": int(m),
        "num_single_image_queries": int(n - q),
    }
    if prec_k is not None:
        out["precision_at_k"] = prec_k
        out["k"] = int(k)
    return out


def _case_bootstrap(values: Dict[str, np.ndarray], case_of_query, n_boot: int, seed: int
                    ) -> Dict[str, np.ndarray]:
    """Means of per-query ``values`` over ``n_boot`` case resamples -> {name: [n_boot]}."""
    _, g_idx = _first_appearance_unique(np.asarray(case_of_query))
    g = int(g_idx.max()) + 1
    per_case_n = np.bincount(g_idx, minlength=g).astype(np.float64)
    sums = {name: np.bincount(g_idx, weights=np.asarray(v, np.float64), minlength=g)
            for name, v in values.items()}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(n_boot, g))       # all draws up front: chunking-independent
    out = {name: np.empty(n_boot) for name in values}
    chunk = max(1, min(n_boot, _MAX_BOOT_ENTRIES // g))
    for s in range(0, n_boot, chunk):
        d = draws[s:s + chunk]
        b = d.shape[0]
        times = np.bincount((d + g * np.arange(b)[:, None]).ravel(),
                            minlength=b * g).reshape(b, g).astype(np.float64)
        den = times @ per_case_n
        for name in values:
            out[name][s:s + b] = (times @ sums[name]) / den
    return out


def _mean(x) -> Optional[float]:
    return float(np.mean(x)) if len(x) else None


def summarize(scores: Dict[str, Any], n_boot: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> Dict[str, Any]:
    """Report from ``retrieval_scores`` output (see ``same_case_retrieval_report``)."""
    q = len(scores["top1"])
    r = np.asarray(scores["num_relevant"])
    m = scores["num_candidates"]
    num_cases = int(len(np.unique(scores["case_of_query"]))) if q else 0
    out: Dict[str, Any] = {
        "top1": _mean(scores["top1"]),
        "map": _mean(scores["average_precision"]),
        "chance_top1": _mean(r / m) if q else None,
        "chance_map": _mean(expected_random_ap(r, np.full(q, m))) if q else None,
        "num_queries": int(q),
        "num_cases": num_cases,
        "num_images": int(scores["num_images"]),
        "num_single_image_queries": int(scores["num_single_image_queries"]),
        "num_tied_top1": int(np.sum(scores["tied_top1"])),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "alpha": float(alpha),
        "ci95": {},
    }
    if n_boot < 0:
        raise ValueError("n_boot must be >= 0")
    if n_boot and q:
        samples = _case_bootstrap({name: scores[key] for name, key in _METRICS},
                                  scores["case_of_query"], n_boot, seed)
        out["ci95"] = {name: _percentile_ci(samples[name], alpha) for name, _ in _METRICS}
    elif n_boot:
        out["ci95"] = {name: [None, None] for name, _ in _METRICS}
    return out


def same_case_retrieval_report(embeddings, case_ids, pixel_hashes=None, n_boot: int = 1000,
                               seed: int = 0, alpha: float = 0.05) -> Dict[str, Any]:
    """Same-case retrieval report among held-out images (module docstring: protocol, chance,
    bootstrap, why duplicates must be absent).

    Returns ``{"top1", "map", "chance_top1", "chance_map", "num_queries", "num_cases",
    "num_images", "num_single_image_queries", "num_tied_top1", "n_boot", "seed", "alpha",
    "ci95": {"top1": [lo, hi], "map": [lo, hi]}}``. ``num_queries`` / ``num_cases`` count the
    queries and cases that were scored (cases with at least two images); the scores and chance
    levels are means over those queries (``None`` when there are none). ``ci95`` is a case
    bootstrap over the fixed per-query scores (the ranking is not recomputed per resample);
    ``{}`` when ``n_boot == 0``.
    """
    return summarize(retrieval_scores(embeddings, case_ids, pixel_hashes), n_boot=n_boot,
                     seed=seed, alpha=alpha)


def _as_scores(x, case_ids, pixel_hashes, name):
    if isinstance(x, dict):
        return x
    if case_ids is None:
        raise ValueError(f"{name} is an embedding array: case_ids are needed")
    return retrieval_scores(x, case_ids, pixel_hashes)


def paired_retrieval_difference(a, b, case_ids=None, pixel_hashes=None, n_boot: int = 1000,
                                seed: int = 0, alpha: float = 0.05, case_ids_b=None
                                ) -> Dict[str, Any]:
    """Paired case bootstrap of ``metric(A) - metric(B)`` for two encoders on the SAME images.

    ``a`` and ``b`` are either ``retrieval_scores`` dicts, or ``[N, D]`` embedding arrays of the
    same images in the same order (then ``case_ids`` is needed; ``case_ids_b``, if given, must
    equal it). Scores whose queries or case ids differ are refused (``ValueError``). Each
    resample draws cases once and evaluates both encoders' per-query scores on it.

    Returns ``{"top1": {...}, "map": {...}, "num_queries", "num_cases", "n_boot", "seed",
    "alpha"}`` where each metric has ``value_a``, ``value_b``, ``difference`` (A - B, point
    estimate), ``ci95`` ([lo, hi] percentile interval of the resampled differences) and
    ``fraction_resamples_diff_le_0`` - the fraction of resamples with A - B <= 0, a one-sided
    bootstrap p-value-like number for "A is better than B" (small: A reliably better; it is 1.0
    when A and B are identical).
    """
    if case_ids_b is not None:
        if case_ids is None or not np.array_equal(np.asarray(case_ids), np.asarray(case_ids_b)):
            raise ValueError("case_ids and case_ids_b differ: the two encoders must be scored "
                             "on the same images in the same order")
    if not isinstance(a, dict) and not isinstance(b, dict) and np.shape(a)[0] != np.shape(b)[0]:
        raise ValueError(f"{np.shape(a)[0]} vs {np.shape(b)[0]} embeddings: the two encoders "
                         "must be scored on the same images")
    sa = _as_scores(a, case_ids, pixel_hashes, "a")
    sb = _as_scores(b, case_ids, pixel_hashes, "b")
    if (sa["num_images"] != sb["num_images"]
            or not np.array_equal(sa["query_index"], sb["query_index"])
            or not np.array_equal(sa["case_of_query"], sb["case_of_query"])):
        raise ValueError("the two score sets cover different images or case ids: a paired "
                         "comparison needs the same images in the same order")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    q = len(sa["top1"])
    out: Dict[str, Any] = {"num_queries": int(q),
                           "num_cases": int(len(np.unique(sa["case_of_query"]))) if q else 0,
                           "n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha)}
    if q:
        diffs = {name: np.asarray(sa[key], np.float64) - np.asarray(sb[key], np.float64)
                 for name, key in _METRICS}
        samples = _case_bootstrap(diffs, sa["case_of_query"], n_boot, seed)
    for name, key in _METRICS:
        va, vb = _mean(sa[key]), _mean(sb[key])
        entry = {"value_a": va, "value_b": vb,
                 "difference": None if va is None else float(np.mean(diffs[name])),
                 "ci95": [None, None], "fraction_resamples_diff_le_0": None,
                 "n_boot": int(n_boot)}
        if q:
            entry["ci95"] = _percentile_ci(samples[name], alpha)
            entry["fraction_resamples_diff_le_0"] = float(np.mean(samples[name] <= 0))
        out[name] = entry
    return out
