"""CPU threads of a worker come from its job's allocation."""

from __future__ import annotations

import os

import torch

from cnn_mellin.cpus import allocated_cpus, use_threads


def test_slurm_cpus_per_task_then_affinity(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert allocated_cpus() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "")
    assert allocated_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert allocated_cpus() == 1


def test_use_threads_sets_torch_and_children_unless_the_user_chose(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        use_threads(1)
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        use_threads(1)
        assert os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)
