"""trainer.threads: one deliberate torch thread count per run, never more than the usable cores by default."""
import pytest
import torch

from aepo.config import ConfigError, load_config
from aepo.train.threads import set_threads, usable_cores


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_the_usable_cores_or_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_threads(0) == usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert set_threads(0) == usable_cores()


def test_affinity_narrows_the_default(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cores() == 1 and set_threads(0) == 1


def test_explicit_count_and_cap(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_threads(3) == 3  # an explicit count is taken as given
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert set_threads(0, cap=4) == 4


def test_negative_threads_is_rejected():
    with pytest.raises(ConfigError, match="trainer.threads"):
        load_config(None, ["trainer.threads=-1"])
