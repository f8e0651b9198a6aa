"""Thread count from the container's CPU quota: cgroup v2 and v1 texts, no quota, missing files, the override
order; and `boomerang serve --threads` reaching the setting."""

import pytest

from app.settings import Settings
from services.cpu.threads import cgroup_cpu_quota, choose_threads, quota_from_cfs, quota_from_cpu_max
from services.errors import InvalidSettingError


@pytest.mark.parametrize(("text", "cpus"), [("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1),
                                            ("400000 100000", 4), ("max 100000\n", None), ("", None),
                                            ("garbage", None)])
def test_cpu_max_texts(text, cpus):
    assert quota_from_cpu_max(text) == cpus


@pytest.mark.parametrize(("quota", "period", "cpus"), [("300000\n", "100000\n", 3), ("-1\n", "100000\n", None),
                                                       ("250000", "100000", 3), ("x", "100000", None)])
def test_cfs_texts(quota, period, cpus):
    assert quota_from_cfs(quota, period) == cpus


def _files(tmp_path, cpu_max=None, cfs_quota=None, cfs_period=None):
    paths = {"cpu_max": tmp_path / "cpu.max", "cfs_quota": tmp_path / "cpu.cfs_quota_us",
             "cfs_period": tmp_path / "cpu.cfs_period_us"}
    for key, text in (("cpu_max", cpu_max), ("cfs_quota", cfs_quota), ("cfs_period", cfs_period)):
        if text is not None:
            paths[key].write_text(text)
    return paths


def test_v2_is_read_before_v1(tmp_path):
    assert cgroup_cpu_quota(**_files(tmp_path, "200000 100000\n", "600000\n", "100000\n")) == 2
    unlimited = tmp_path / "unlimited"
    unlimited.mkdir()
    assert cgroup_cpu_quota(**_files(unlimited, "max 100000\n", "600000\n", "100000\n")) is None


def test_v1_files_and_missing_files(tmp_path):
    assert cgroup_cpu_quota(**_files(tmp_path, cfs_quota="300000\n", cfs_period="100000\n")) == 3
    assert cgroup_cpu_quota(**_files(tmp_path / "none")) is None
    only_quota = tmp_path / "half"
    only_quota.mkdir()
    assert cgroup_cpu_quota(**_files(only_quota, cfs_quota="300000\n")) is None


def test_the_quota_chooses_unless_told_otherwise():
    assert choose_threads(None, environ={}, quota=2, affinity=16) == (2, "the cgroup CPU quota")
    assert choose_threads(None, environ={}, quota=None, affinity=6) == (6, "the CPUs this process may use")
    assert choose_threads(None, environ={}, quota=8, affinity=3)[0] == 3  # a cpuset narrower than the quota
    assert choose_threads(None, environ={"OMP_NUM_THREADS": "1"}, quota=4, affinity=8) == (1, "OMP_NUM_THREADS")
    assert choose_threads(None, environ={"OMP_NUM_THREADS": "lots"}, quota=4, affinity=8)[0] == 4
    assert choose_threads(5, environ={"OMP_NUM_THREADS": "1"}, quota=2, affinity=8) == (5, "the threads setting")


def test_a_thread_count_below_one_is_refused_by_name():
    with pytest.raises(InvalidSettingError) as caught:
        choose_threads(0, environ={}, quota=None, affinity=2)
    assert caught.value.param == "threads"


def test_the_setting_comes_from_the_flag_and_the_environment(monkeypatch):
    from services.cli import build_parser

    args = build_parser().parse_args(["serve", "--threads", "3"])
    assert Settings(threads=args.threads).threads == 3
    monkeypatch.setenv("BOOMERANG_THREADS", "2")
    assert Settings().threads == 2
    monkeypatch.delenv("BOOMERANG_THREADS")
    assert Settings().threads is None


def test_the_engine_factory_sizes_torch_once(caplog):
    import torch

    from services.engine.factory import apply_serving_threads

    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="services.engine.factory"):
            assert apply_serving_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert [r.getMessage() for r in caplog.records] == ["torch threads: 1 (from the threads setting)"]
    finally:
        torch.set_num_threads(before)
