"""Every namespaced metric reaches the trackers: `report_to="wandb"` (offline) and `report_to="trackio"` (local).

A short CPU training with five methods on (HIVE stages 1+2, the V0.5 baseline, HES selection, cost-aware sampling)
logs through transformers 5.19's own callbacks (`WandbCallback`, `TrackioCallback`); each test then reads back what
the tracker stored on disk and compares it, key by key and value by value, with the trainer's `log_history`.

- wandb 0.31 (WANDB_MODE=offline, WANDB_DIR in tmp_path) writes `wandb/offline-run-*/run-*.wandb` (no
  `wandb-summary.json` offline). wandb no longer ships a Python reader for it, so `_wandb_records` walks the file's
  LevelDB-log framing (7-byte `:W&B` header, 32 KiB blocks, records of `crc32 | length | type`) and parses each
  record with wandb's own protobuf (`wandb.proto.wandb_internal_pb2.Record`); the CRC is not verified.
  `wandb.finish()` returns before wandb-core has finished writing the file: the reader waits for the final `exit`
  record.
- trackio 0.43 without a Space logs to a local SQLite database `<TRACKIO_DIR>/<project>.db`, read back with its own
  `trackio.SQLiteStorage.get_logs`. `TRACKIO_DIR` is read once at import (`trackio.utils`) and copied into several
  trackio modules, so `_local_trackio_dir` sets the environment variable and repoints those module constants.

transformers prefixes training logs with `train/` (`rewrite_logs`), so `selection/kept` is stored as
`train/selection/kept`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time

import pytest
from grpo_args import verifier_trainer

NAMESPACES = ("selection/", "budget/", "hes/", "cost/")
METHODS = {
    "selection_history": True,
    "selection_entropy": True,
    "budget_baseline": True,
    "hes_selection": True,
    "cost_aware_sampling": True,
}


def _train(base_model_dir, train_ds, kwargs):
    trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
    trainer.train()
    return trainer


def _namespaced(entry: dict) -> dict[str, float]:
    return {k: v for k, v in entry.items() if k.startswith(NAMESPACES)}


def _check_tracker_rows(trainer, rows: list[dict]) -> None:
    """Every namespaced key the trainer logged is in the tracker (as `train/<key>`), with the same value per step."""
    history = trainer.state.log_history
    logged = {k for entry in history for k in _namespaced(entry)}
    assert {k.split("/")[0] + "/" for k in logged} == set(NAMESPACES)  # every method reported something
    stored = {k for row in rows for k in row}
    missing = sorted(k for k in logged if f"train/{k}" not in stored)
    assert not missing, f"not stored by the tracker: {missing}"
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == trainer.state.global_step
    for entry in steps:
        matches = [row for row in rows if row.get("train/global_step") == entry["step"] and "train/loss" in row]
        assert len(matches) == 1, entry["step"]
        for key, value in _namespaced(entry).items():
            got = matches[0][f"train/{key}"]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert got is None or math.isnan(got), key
            else:
                assert got == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ---- wandb (offline) ---------------------------------------------------------------------------------------------
def _wandb_records(path: str):
    """Yield the `Record` protos of a `.wandb` file (LevelDB-log framing, wandb's protobuf)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    block_size, pos, pending = 32 * 1024, 7, b""
    while pos + 7 <= len(data):
        room = block_size - pos % block_size
        if room < 7:  # block tail too short for a header: zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill: end of the written data
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(path: str, timeout_s: float = 60.0) -> list[dict]:
    """History rows of a finished offline run. `wandb.finish()` returns before wandb-core has flushed the file, so
    wait until its final `exit` record is there (the log is sequential: everything before it is written then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(_wandb_records(path))
        except Exception:  # a record cut mid-write
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.2)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def test_wandb_offline_run_stores_every_namespaced_metric(
    base_model_dir, chain_sum_splits, grpo_kwargs, tmp_path, monkeypatch
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(max_steps=3, report_to="wandb", project="efficient-rlvr-tests", run_name="wandb", **METHODS)
    trainer = _train(base_model_dir, train_ds, kwargs)
    wandb.finish()  # transformers leaves the run open; finishing writes the exit record
    (path,) = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*", "run-*.wandb"))
    _check_tracker_rows(trainer, _wandb_history(path))


# ---- trackio (local SQLite) --------------------------------------------------------------------------------------
def _local_trackio_dir(path, monkeypatch) -> None:
    """Point trackio's local store at `path`, whether or not trackio was imported earlier in this process."""
    monkeypatch.setenv("TRACKIO_DIR", str(path))
    import trackio  # noqa: F401

    for name, module in list(sys.modules.items()):
        if (name == "trackio" or name.startswith("trackio.")) and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", path)
            for sub in ("MEDIA_DIR", "ARTIFACTS_DIR"):
                if hasattr(module, sub):
                    monkeypatch.setattr(module, sub, path / sub.split("_")[0].lower())


def test_trackio_local_run_stores_every_namespaced_metric(
    base_model_dir, chain_sum_splits, grpo_kwargs, tmp_path, monkeypatch
):
    pytest.importorskip("trackio")
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)  # local only: no Space, no Hub
    store = tmp_path / "trackio"
    _local_trackio_dir(store, monkeypatch)
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(
        max_steps=3, report_to="trackio", project="efficient-rlvr-tests", run_name="trackio", **METHODS
    )
    trainer = _train(base_model_dir, train_ds, kwargs)  # TrackioCallback.on_train_end calls trackio.finish()
    from trackio import SQLiteStorage

    assert (store / "efficient-rlvr-tests.db").exists()
    _check_tracker_rows(trainer, SQLiteStorage.get_logs("efficient-rlvr-tests", "trackio"))
