"""Workers that fit the machine: what a grading process sets up before its first notebook, and the
thread count each kernel gets."""
from __future__ import annotations

import torch

from grader import cli, pipeline


def test_prepare_loads_the_dataset_and_holds_torch_to_the_kernels_threads(grading_config):
    config = grading_config(threads=1)
    before = torch.get_num_threads()
    pipeline._dataset.cache_clear()
    try:
        torch.set_num_threads(2)
        pipeline.prepare(config)
        assert torch.get_num_threads() == 1
        train, test = pipeline.dataset(config)
        assert (len(train[0]), len(test[0])) == (config.provisioned.train_size, config.provisioned.test_size)
        assert pipeline._dataset.cache_info().hits >= 1  # loaded by prepare, not again per notebook
    finally:
        torch.set_num_threads(before)


def test_threads_per_kernel_times_jobs_never_exceeds_the_cores(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 4)
    assert cli._threads(1, jobs=4) == 1
    assert cli._threads(8, jobs=1) == 4
    assert cli._threads(8, jobs=2) == 2
    assert cli._threads(3, jobs=3) == 1
    assert cli._threads(2, jobs=8) == 1  # never zero, even when the jobs alone fill the cores
