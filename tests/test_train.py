"""Pretraining: logs, checkpoints that are Hugging Face directories, exact resume, DDP under torchrun, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import run_cli


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_run_writes_logs_checkpoints_and_plot(tiny_trained):
    log = losses(tiny_trained)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in log)
    assert [r["step"] for r in log if "val_loss" in r] == [4, 8] and all(r["val_bpb"] > 0 for r in log if "val_bpb" in r)
    assert log[-1]["loss"] < log[0]["loss"]
    assert sorted(p.name for p in (tiny_trained / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "trainer_state.pt"):
        assert (tiny_trained / "checkpoints" / "step-000008" / name).is_file()
    assert (tiny_trained / "final" / "model.safetensors").is_file() and not (tiny_trained / "final" / "trainer_state.pt").exists()
    assert (tiny_trained / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tiny_trained.rglob(".*tmp*"))


def test_log_line_in_seed_style(tiny_packed, tiny_preset, tmp_path):
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(tmp_path / "r"),
                   "--max-steps", "2", "--log-interval", "1", "--quiet", check=True)
    line = re.search(r"Epoch:\[1/1\]\(2/2\) loss:\d+\.\d{3} lr:\d\.\d{12} epoch_time:\d+\.\dmin tokens/s:[\d,]+ GFLOP/s:\d+\.\d", proc.stdout)
    assert line, proc.stdout
    assert "final model:" in proc.stdout


def test_resume_reproduces_uninterrupted_losses(tiny_packed, tiny_preset, tmp_path, tiny_trained):
    out = tmp_path / "interrupted"
    args = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--quiet"]
    proc = run_cli(*args, "--stop-after", "4", "--save-interval", "2", check=True)
    assert "final model" not in proc.stdout and not (out / "final").exists()
    # Simulate a crash after step 5: the log has a record past the last checkpoint (step 4).
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 99.0, "lr": 0.0, "tokens_per_s": 0.0}) + "\n")
    proc = run_cli(*args, "--resume", "--save-interval", "2", check=True)
    assert "resuming from" in proc.stdout and "step 4" in proc.stdout
    resumed, straight = losses(out), losses(tiny_trained)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]


def test_existing_run_needs_resume(tiny_packed, tiny_preset, tiny_trained):
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(tiny_trained))
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_two_processes_matches_single_process(tiny_packed, tiny_preset, tmp_path):
    """2 processes x batch 2 (gloo DDP) see the same samples as 1 process x batch 4, so losses agree."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    common = ["--config", str(tiny_preset), "--data", str(tiny_packed), "--max-steps", "4", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29517",
                           "-m", "minicoder", "pretrain", *common, "--out", str(ddp_out), "--batch-size", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    run_cli("pretrain", *common, "--out", str(single_out), "--batch-size", "4", check=True)
    ddp, single = losses(ddp_out), losses(single_out)
    assert len(ddp) == len(single) == 4
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert (ddp_out / "final" / "model.safetensors").is_file()


def test_truncated_checkpoint_gives_clear_error(tiny_trained, tiny_packed, tiny_preset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_trained, run)
    ckpt = run / "checkpoints" / "step-000008"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_cli("generate", str(ckpt), "--prompt", "def ")
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
    # With every checkpoint unloadable, resume refuses (falling back past one is in test_train_faults.py).
    state = run / "checkpoints" / "step-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(run), "--resume",
                   "--max-steps", "12")
    assert proc.returncode == 2 and "no checkpoint loads completely" in proc.stderr
    assert "step-000008/model.safetensors" in proc.stderr and "step-000004/trainer_state.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000008"]  # untouched


def test_bad_settings_are_named(tiny_packed, tiny_preset, tmp_path):
    base = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(tmp_path / "r")]
    proc = run_cli(*base, "--no-such-setting", "3")
    assert proc.returncode == 2 and "no_such_setting" in proc.stderr
    proc = run_cli(*base, "--lr", "fast")
    assert proc.returncode == 2 and "lr" in proc.stderr
    proc = run_cli("pretrain", "--config", str(tmp_path / "missing.toml"), "--data", str(tiny_packed), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "missing.toml" in proc.stderr
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "meta.json" in proc.stderr
    assert not (tmp_path / "r").exists()
    for p in (proc,):
        assert "Traceback" not in p.stderr
