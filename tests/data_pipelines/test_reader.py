import collections

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import reader
from tests.helpers import build_records


def codes(views):
    """Red channel at a pixel -> (case, image) identity codes."""
    return np.rint(views[:, 0, 0, 0] * 255).astype(int)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bags")
    sizes = [1, 2, 3, 5, 1, 4, 2, 3]
    ids = build_records(out, sizes, labels=[0, 1, 0, 1, None, 0, 1, 0], num_shards=3)
    return str(out), sizes, ids


def take(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def test_micle_pairs_are_distinct_images_of_one_case(records):
    path, sizes, ids = records
    batches = take(reader.make_dataset(path, "train", "micle", 4, 8, seed=0), 40)
    seen_pairs = collections.defaultdict(set)
    for b in batches:
        c1, c2 = codes(b["view1"]), codes(b["view2"])
        for k in range(4):
            case = ids[b["case_id"][k].decode()]
            assert c1[k] // 10 == c2[k] // 10 == case  # both views from the batch's own case
            i, j = c1[k] % 10, c2[k] % 10
            assert (i, j) == tuple(b["image_indices"][k])
            if sizes[case] == 1:
                assert i == j == 0  # one-image case: two views of that image
            else:
                assert i != j and 0 <= i < sizes[case] and 0 <= j < sizes[case]
            seen_pairs[case].add((i, j))
    # re-drawn as the case comes round again: a 5-image case shows many different pairs
    assert len(seen_pairs[3]) >= 8


def test_micle_pairs_uniform(tmp_path):
    ids = build_records(tmp_path, [3])
    batches = take(reader.make_dataset(str(tmp_path), "train", "micle", 30, 8, seed=7), 40)
    pairs = collections.Counter()
    for b in batches:
        pairs.update(zip(codes(b["view1"]) % 10, codes(b["view2"]) % 10))
    assert set(pairs) == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}
    expected = 1200 / 6
    chi2 = sum((v - expected) ** 2 / expected for v in pairs.values())
    assert chi2 < 20.5, pairs  # 5 dof, p ~ 0.001


def test_simclr_views_come_from_one_image(records):
    path, sizes, ids = records
    picked = collections.Counter()
    for b in take(reader.make_dataset(path, "train", "simclr", 4, 8, seed=0), 30):
        np.testing.assert_array_equal(codes(b["view1"]), codes(b["view2"]))
        picked.update(codes(b["view1"]).tolist())
    assert len([c for c in picked if c // 10 == 3]) >= 4  # different images of a case over epochs


def test_deterministic_under_seed(records):
    path = records[0]

    def stream(seed):
        aug = lambda img, s: tf.image.stateless_random_flip_left_right(img, s)  # noqa: E731
        ds = reader.make_dataset(path, "train", "micle", 4, 8, seed=seed, augment_fn=aug)
        return take(ds, 12)

    a, b, c = stream(11), stream(11), stream(12)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["case_id"], y["case_id"]) or
               not np.array_equal(x["image_indices"], y["image_indices"]) for x, y in zip(a, c))


def test_supervised_eval_pass_sees_every_image_once(records):
    path, sizes, ids = records
    ds = reader.make_dataset(path, "train", "supervised", 5, 8, training=False)
    got = sorted(codes(b["image"]).tolist() for b in take(ds, 100))
    flat = sorted(sum(got, []))
    assert flat == sorted(10 * c + i for c, n in enumerate(sizes) for i in range(n))
    for b in take(ds, 100):
        for code, cid, label in zip(codes(b["image"]), b["case_id"], b["label"]):
            assert ids[cid.decode()] == code // 10
            assert label == [0, 1, 0, 1, -1, 0, 1, 0][code // 10]


def test_filters_case_subset_and_labelled_only(records):
    path, sizes, ids = records
    keep = [h for h, c in ids.items() if c in (2, 3, 4)]
    ds = reader.make_dataset(path, "train", "supervised", 64, 8, training=False, case_ids=keep)
    assert sorted(set(codes(take(ds, 1)[0]["image"]) // 10)) == [2, 3, 4]
    ds = reader.make_dataset(path, "train", "supervised", 64, 8, training=False,
                             labelled_only=True)
    assert 4 not in set(codes(take(ds, 1)[0]["image"]) // 10)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_input_pipelines_partition_the_cases(records, tmp_path, num_shards):
    path = records[0]
    if num_shards == 1:
        build_records(tmp_path, records[1], num_shards=1)
        path = str(tmp_path)
    seen = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        ds = reader.make_dataset(path, "train", "supervised", 64, 8, training=False,
                                 input_context=ctx)
        seen.append(set(codes(take(ds, 1)[0]["image"]) // 10))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(8))


def test_distributed_dataset_per_replica_batches(records, two_replica_strategy):
    path = records[0]
    dist = reader.distributed_dataset(two_replica_strategy, path, "train", "micle", 6, 8, seed=0)
    batch = next(iter(dist))
    locals_ = two_replica_strategy.experimental_local_results(batch["view1"])
    assert [t.shape[0] for t in locals_] == [3, 3]
    with pytest.raises(ValueError, match="divisible"):
        reader.distributed_dataset(two_replica_strategy, path, "train", "micle", 5, 8)


def test_missing_shard_and_unknown_mode(records, tmp_path):
    build_records(tmp_path, [1, 1, 1], num_shards=3)
    (tmp_path / "train-00001-of-00003.tfrecord").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shard\(s\) \[1\]"):
        reader.make_dataset(str(tmp_path), "train", "micle", 2, 8)
    with pytest.raises(ValueError, match="unknown reader mode"):
        reader.make_dataset(records[0], "train", "byol", 2, 8)


def test_read_case_index(records):
    path, sizes, ids = records
    index = reader.read_case_index(path, "train")
    assert sorted((ids[c], n) for c, _, n in index) == list(enumerate(sizes))
    assert {ids[c]: l for c, l, _ in index}[4] is None


def test_epoch_seeded_stream_resumes_exactly(records):
    path = records[0]
    aug = lambda img, s: tf.image.stateless_random_flip_left_right(img, s)  # noqa: E731

    def stream(start_epoch, n):
        ds = reader.make_dataset(path, "train", "micle", 3, 8, seed=4, augment_fn=aug,
                                 steps_per_epoch=2, start_epoch=start_epoch)
        return take(ds, n)

    full, resumed = stream(0, 6), stream(1, 4)
    for x, y in zip(full[2:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # epochs differ from each other (new shuffle and new pairs each epoch)
    assert any(not np.array_equal(full[i]["image_indices"], full[i + 2]["image_indices"])
               for i in range(2))


# ----------------------------------------------------------------------------- decoded-case cache
def test_cache_decoded_gives_the_same_images(records):
    path = records[0]
    plain = take(reader.make_dataset(path, "train", "supervised", 5, 8, training=False), 100)
    cached = take(reader.make_dataset(path, "train", "supervised", 5, 8, training=False,
                                      cache_decoded=True), 100)
    assert len(plain) == len(cached) == 5  # 21 images, batches of 5
    for x, y in zip(plain, cached):
        np.testing.assert_array_equal(x["case_id"], y["case_id"])
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_allclose(x["image"], y["image"], atol=1e-7, rtol=0)


def test_cache_decoded_training_pairs_determinism_and_resume(records):
    path, sizes, ids = records

    def stream(start_epoch, n, seed=4):
        ds = reader.make_dataset(path, "train", "micle", 3, 8, seed=seed, steps_per_epoch=2,
                                 start_epoch=start_epoch, cache_decoded=True)
        return take(ds, n)

    full, again, resumed = stream(0, 8), stream(0, 8), stream(2, 4)
    for x, y in zip(full, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(full[4:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for b in full:  # still two distinct images of the batch's own case
        c1, c2 = codes(b["view1"]), codes(b["view2"])
        for k in range(3):
            case = ids[b["case_id"][k].decode()]
            assert c1[k] // 10 == c2[k] // 10 == case
            assert (c1[k] != c2[k]) == (sizes[case] > 1)
    assert any(not np.array_equal(full[i]["case_id"], full[i + 2]["case_id"]) for i in range(6))


def test_cache_decoded_later_epochs_do_not_read_the_files(records, tmp_path):
    """After the first pass the shards can vanish: the cache serves every later epoch (and
    without the cache the same thing fails, so the test can tell)."""
    import shutil
    for cache in (True, False):
        copy = tmp_path / f"copy_{cache}"
        shutil.copytree(records[0], copy)
        ds = reader.make_dataset(str(copy), "train", "simclr", 4, 8, seed=1, steps_per_epoch=2,
                                 cache_decoded=cache)
        it = iter(ds)
        first = [next(it) for _ in range(2)]
        for shard in copy.glob("train-*.tfrecord"):
            shard.unlink()
        if cache:
            later = [next(it)["case_id"].numpy() for _ in range(6)]
            assert len(later) == 6 and first
        else:
            with pytest.raises(tf.errors.NotFoundError):
                for _ in range(6):
                    next(it)
