"""Inference on a split (what validation, evaluation, the demo and the retrieval monitors all
use): record order, the padded last batch changes nothing, features and case ids line up."""
import keras
import numpy as np
import pytest

from data_pipelines import reader
from micle_tf import config as C, inference, rundir

SIZE = 32


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    cfg = C.FinetuneConfig(model=C.ModelConfig(backbone="resnet18", width_multiplier=0.125,
                                               image_size=SIZE))
    return rundir.build_classifier(cfg, "multiclass", 3)


def _split(data_dir, split="test"):
    """(images, labels, case ids) of a split, read in one batch, no model involved."""
    batch = next(iter(reader.make_dataset(data_dir, split, "supervised", 10_000, SIZE,
                                          training=False)))
    return batch["image"], batch["label"].numpy(), [c.decode() for c in batch["case_id"].numpy()]


def test_predict_split_in_record_order_with_a_padded_last_batch(classifier, ph2_records):
    images, labels, cases = _split(ph2_records)
    # 300 images = 256 + 44: the last batch is padded to one traced shape
    ids, got_labels, probs = inference.predict_split(classifier, ph2_records, "test", SIZE,
                                                     batch_size=256)
    assert list(ids) == cases and got_labels.tolist() == labels.tolist()
    expected = classifier.probabilities(classifier(images, training=False)["logits"]).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # one predict_fn serves several splits (traced once per batch shape)
    fn = inference.make_predict_fn(classifier)
    again = inference.predict_split(classifier, ph2_records, "test", SIZE, 256, predict_fn=fn)
    np.testing.assert_array_equal(again[2], probs)


def test_embed_and_embed_split(classifier, ph2_records):
    images, labels, cases = _split(ph2_records)
    emb, case_ids = inference.embed_split(classifier.encoder, ph2_records, "test", SIZE,
                                          batch_size=100)
    assert emb.dtype == np.float32 and emb.shape[0] == len(cases) == len(case_ids)
    assert list(case_ids) == cases
    np.testing.assert_allclose(emb, classifier.encoder(images, training=False).numpy(),
                               atol=1e-5)
    ds = reader.make_dataset(ph2_records, "test", "supervised", 100, SIZE, training=False)
    few, few_labels, few_cases = inference.embed(classifier.encoder, ds, max_batches=2)
    assert few.shape == (200, emb.shape[1]) and few_labels.tolist() == labels[:200].tolist()
    np.testing.assert_allclose(few, emb[:200], atol=1e-5)
    empty = inference.embed(classifier.encoder, ds, max_batches=0)
    assert empty[0].shape == (0, 0)
