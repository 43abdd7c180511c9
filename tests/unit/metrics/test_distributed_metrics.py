"""The metric classes under a real 2-process gloo group: padded repeats count once, empty ranks do not hang.

A distributed sampler over 5 samples and 2 processes gives rank 0 the indices (0, 2, 4) and rank 1 (1, 3, 0):
sample 0 twice. Every metric must equal its single-process value, also one that a rank never updated.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_unlearn.metrics import AnswerProbability, MembershipInferenceAUC, RougeLRecall, TruthRatio

pytestmark = pytest.mark.timeout(300)

NLL = [0.1, 0.7, 2.0, 1.3, 0.4]
PERTURBED = [[0.5, 0.9], [0.2, 0.3], [3.0, 1.0], [1.0, 1.1], [0.4, 2.0]]
PREDS = ["a b", "b", "c d e", "a", "d"]
REFS = ["a b c", "b c", "c d", "x", "d e"]
SHARDS = {0: [0, 2, 4], 1: [1, 3, 0]}


def _fill(metrics: dict, indices: list[int], with_only_rank1: bool) -> None:
    index = torch.tensor(indices)
    nll = torch.tensor([NLL[i] for i in indices], dtype=torch.float64)
    metrics["prob"].update(nll, index)
    metrics["truth"].update(nll, torch.tensor([PERTURBED[i] for i in indices], dtype=torch.float64), index)
    metrics["rouge"].update([PREDS[i] for i in indices], [REFS[i] for i in indices], index)
    metrics["mia"].update(nll, torch.tensor([i % 2 == 1 for i in indices]), index)
    if with_only_rank1:
        metrics["only_rank1"].update(nll, index)


def _new() -> dict:
    return {"prob": AnswerProbability(), "truth": TruthRatio("forget"), "rouge": RougeLRecall(),
            "mia": MembershipInferenceAUC(), "only_rank1": AnswerProbability()}


def _results(metrics: dict) -> dict[str, list[float]]:
    return {name: [float(m.compute()), *m.per_sample().tolist()] for name, m in metrics.items()}


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = _new()
        _fill(metrics, SHARDS[rank], with_only_rank1=rank == 1)
        out[rank] = _results(metrics)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_a_repeated_sample_equal_one_process() -> None:
    single = _new()
    _fill(single, list(range(5)), with_only_rank1=False)
    single["only_rank1"].update(torch.tensor([NLL[i] for i in (0, 1, 3)], dtype=torch.float64), torch.tensor([0, 1, 3]))
    expected = _results(single)
    assert expected["prob"][0] == pytest.approx(sum(math.exp(-x) for x in NLL) / 5)

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        assert results[rank].keys() == expected.keys()
        for name, values in expected.items():
            assert results[rank][name] == pytest.approx(values, rel=0, abs=1e-12), (rank, name)
