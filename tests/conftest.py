"""Test-session setup shared by every test.

Two logical CPU devices are configured before TensorFlow initialises its devices, so
MirroredStrategy tests get two real replicas on a CPU-only machine. Everything else runs
on the first device as usual.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # devices already initialised by an earlier import
    pass


def pytest_collection_modifyitems(items):
    """Tests that use `two_replica_strategy` run last. Once a distributed dataset has been
    iterated over the two logical CPUs, every later training run in that process has
    several times the system time: the learning test took 45-53 s alone and 73-93 s after the
    one-second LARS two-replica test (`python -m bench.strategy_aftereffect` measures it). Stable
    order otherwise, so parallel workers collect the same list."""
    items.sort(key=lambda item: "two_replica_strategy" in getattr(item, "fixturenames", ()))


@pytest.fixture
def two_replica_strategy():
    """A MirroredStrategy over two logical CPU devices."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, devices
    # Each new MirroredStrategy restarts its collective keys; TF caches collective shapes by
    # key, so a later strategy with other shapes would clash. TF's own tests bump the base.
    tf.distribute.MirroredStrategy._collective_key_base += 1000
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(scope="session")
def ph2_records(tmp_path_factory):
    """The embedded PH² set converted once per test session (199 lesion bags of 10 distinct patches; the 1,990 copies rejected)."""
    from data_pipelines import writer
    from data_pipelines.sources import ph2

    out = tmp_path_factory.mktemp("ph2_records")
    writer.write_dataset(ph2.build(), str(out), salt=b"test-salt", seed=0, overwrite=True)
    return str(out)
