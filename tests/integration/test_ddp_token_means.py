"""Two DDP processes (gloo, CPU) take the same optimizer step as one process, for every loss.

The four forget examples of ``token_means_cases`` (answers of 23/101/73/36 labelled tokens) in one step:
one process with a batch of 4 against two processes with batches of 2, and two processes with batches of
1 accumulated twice. Token and sequence means are normalised by the counts of the whole step over both
processes, so the updates agree to float32 rounding. Before, each process averaged over its own tokens and
DDP averaged the processes; the relative differences of the update from one process were (2 x 2, 2 x 1 x 2):

    GA 0.511, 0.566 | GD 0.424, 0.470 | KL 0.511, 0.566 | NPO 6.45e-4, 1.21e-3 | DPO 5.44e-4, 1.02e-3 |
    SimNPO 0.0501, 0.0937 | LLMU 0.319, 0.353 | EUL 0.0830, 0.115 | SFT 0.511, 0.566

Now they are at most 4.1e-7 (SimNPO; the others about 1e-7).

All the DDP runs share one launch of two processes (``token_means_cases.py`` run as a script), since each
launch costs many seconds on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_ddp import run_ddp
from token_means_cases import DDP_SPLITS, LOSSES, one_step, relative_difference, write_dataset

pytestmark = pytest.mark.timeout(900)
TESTS = Path(__file__).resolve().parents[1]


def test_two_processes_take_the_step_one_process_takes_for_every_loss(tiny_world: dict, tmp_path: Path) -> None:
    data = write_dataset(tiny_world["tokenizer"], tmp_path / "data")
    (tmp_path / "world.json").write_text(json.dumps(tiny_world))
    # Without OMP_NUM_THREADS Lightning's launcher gives each process its share of the cores.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    script = [sys.executable, str(TESTS / "token_means_cases.py"), str(tmp_path / "world.json"), str(data),
              str(tmp_path / "ddp")]
    run_ddp(script, tmp_path, env, timeout=800)
    ddp = torch.load(tmp_path / "ddp" / "updates.pt", weights_only=True)

    differences = {}
    for loss in LOSSES:
        single = one_step(tiny_world, data, loss, 1, 4, 1, tmp_path / "single" / loss)
        assert sum(float(u.abs().sum()) for u in single.values()) > 1e-3
        for split in DDP_SPLITS:
            differences[f"{loss}/{split}"] = relative_difference(ddp[f"{loss}/{split}"], single)
    assert max(differences.values()) < 1e-6, differences
