"""Weights & Biases, offline: the run gets the full config, the metrics and the TOFU summary; default logger.

wandb 0.31 writes an offline run only into its ``.wandb`` file (no ``config.yaml`` or ``wandb-summary.json``
until synced), so the test reads that file's records back with the protobuf classes wandb ships.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_unlearn.cli import main

ROOT = Path(__file__).resolve().parents[2]
WANDB = str(ROOT / "configs" / "logging" / "wandb.yaml")
BLOCK, CHUNK_HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file: after a 7-byte file header, chunks of ``crc32, length
    (little-endian u16), kind`` then data; kind 1 is a whole record, 2/3/4 its first/middle/last piece."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        pending += data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_run(path: Path) -> dict[str, Any]:
    """Config, last summary values, all history rows and uploaded file names of one offline run."""
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "files": set()}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            run["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            run["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "files":
            run["files"].update(f.path for f in record.files.files)
    return run


@pytest.mark.timeout(300)  # a fit and a test logging to W&B offline: about 10 s on one thread
def test_wandb_run_has_config_metrics_and_tofu_summary(
    tiny_world: dict, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_cwd))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    common = [
        "--config", WANDB, "--trainer.logger.init_args.save_dir", str(tmp_cwd / "runs"),
        "--model", "NPO", "--model.small_model", tiny_world["small"], "--model.large_model", tiny_world["large"],
        "--model.max_new_tokens", "4", "--data.forget_split", "forget01", "--data.retain_split", "retain99",
        "--data.batch_size", "4", "--data.max_length", "128", "--data.eval_subset", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]
    # Not fast_dev_run: it swaps every logger for a dummy.
    fit = main(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"])
    main(["test", *common, "--ckpt_path", fit.trainer.checkpoint_callback.best_model_path])

    runs = [read_run(p) for p in sorted(tmp_cwd.glob("runs/wandb/offline-run-*/*.wandb"))]
    assert len(runs) == 2, "each command is its own W&B run"
    (trained,) = [r for r in runs if any("train/loss" in row for row in r["history"])]
    (tested,) = [r for r in runs if r is not trained]

    config = trained["config"]["config"]  # the whole resolved config, not only the model's arguments
    assert config["trainer"]["max_steps"] == 2 and config["seed_everything"] == 0
    assert config["model"]["class_path"] == "lightning_unlearn.modules.NPO"
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert config["trainer"]["logger"]["init_args"]["log_model"] is False
    steps = [row["trainer/global_step"] for row in trained["history"] if "train/loss" in row]
    assert steps == [0, 1]
    assert isinstance(trained["summary"]["val/forget_truth_ratio"], float)

    summary = json.loads((tmp_cwd / "runs" / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_quality"] is None  # no retain reference: kept in the W&B summary as null
    assert {f"tofu/{k}": v for k, v in summary.items()}.items() <= tested["summary"].items()
    assert {"TOFU_SUMMARY.json", "TOFU_EVAL.json"} <= tested["files"]
    assert tested["config"]["config"]["ckpt_path"] == fit.trainer.checkpoint_callback.best_model_path


def test_default_logger_is_tensorboard(tiny_world: dict, tmp_cwd: Path) -> None:
    """Without a logger config Lightning picks TensorBoard, which needs ``tensorboard`` installed (else CSV)."""
    cli = main(["fit", "--model", "GA", "--model.small_model", tiny_world["small"], "--data.forget_split",
                "forget01", "--data.retain_split", "null", "--data.evaluation", "loss", "--data.max_length", "128",
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
                "false"])
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert (Path(cli.trainer.logger.log_dir) / "config.yaml").is_file()
