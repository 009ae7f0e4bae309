"""The private Keras/TensorFlow attributes micle_tf.models.keras_compat patches or calls exist on
the installed versions, and a missing one fails loudly (naming it and the Keras version) instead
of silently."""
import keras
import pytest
import tensorflow as tf

from micle_tf.models import keras_compat as compat
from micle_tf.training.distribute import prepare_keras_fit


def test_patched_attributes_exist_on_installed_keras():
    checked = compat.check()
    assert any("_maybe_symbolic_build" in c for c in checked)
    assert any("_in_multi_worker_mode" in c for c in checked)


def test_missing_attribute_names_it_and_the_keras_version():
    with pytest.raises(compat.KerasCompatError) as e:
        compat.skip_symbolic_build(object())
    assert "object._maybe_symbolic_build" in str(e.value)
    assert keras.__version__ in str(e.value)

    class Extended:
        pass

    class Strategy:
        extended = Extended()

    with pytest.raises(compat.KerasCompatError, match=r"Extended\._in_multi_worker_mode"):
        compat.in_multi_worker_mode(Strategy())


def test_prepare_keras_fit_skips_the_symbolic_build_of_a_built_model():
    model = keras.Sequential([keras.layers.Dense(2)])
    model.build((None, 3))
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    before = model._maybe_symbolic_build
    prepare_keras_fit(model, tf.distribute.get_strategy())
    assert model._maybe_symbolic_build is not before
    assert model._maybe_symbolic_build(iterator=iter(())) is None  # never touches the data
