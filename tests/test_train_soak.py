"""Soak: kill -9 a training run at 20 random moments (start-up, steps, checkpoint saves and rotations, log
writes), check after each kill that every checkpoint loads, and finish with a resume whose losses are exactly
those of an uninterrupted run. `make test-soak`; MINICODER_SOAK_SEED picks other moments."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from test_train_faults import assert_every_checkpoint_loads, losses

KILLS = 20
STEPS = 90  # each kill lands within ~3 steps of the resume, so 20 kills never reach the end


def log_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "log.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def hidden_entries(folder: Path) -> list[str]:
    try:
        return [name for name in os.listdir(folder) if name.startswith(".")]
    except FileNotFoundError:
        return []


def torn_last_line(run_dir: Path) -> bool:
    try:
        data = (run_dir / "log.jsonl").read_bytes()
    except FileNotFoundError:
        return False
    return bool(data) and not data.endswith(b"\n")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def kill_at_random_moment(args: list[str], run_dir: Path, step_seconds: float, rng: random.Random) -> str:
    """Start a resume and SIGKILL it at a random moment, measured in steps of this machine so the moments spread
    over steps, saves and rotations at any speed; return where it was aimed ('resume', 'save' or 'training')."""
    before = log_lines(run_dir)
    stdout = run_dir.parent / "killed.stdout"
    with open(stdout, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "minicoder", *args], stdout=out, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    aim = rng.random()
    try:
        if aim < 0.3 and before:  # tidying leftovers, setting checkpoints aside, truncating the log
            moment = "resume"
            wait_for(lambda: "resuming from" in stdout.read_text(), proc)
            time.sleep(rng.uniform(0.0, 0.5) * step_seconds)
        elif aim < 0.6:  # inside a checkpoint save or rotation: as soon as its hidden work directory appears
            moment = "save"
            earlier = set(hidden_entries(run_dir / "checkpoints"))  # a killed run's leftovers, tidied at start-up
            wait_for(lambda: set(hidden_entries(run_dir / "checkpoints")) - earlier, proc)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # anywhere in steps, checkpoint saves, rotations, log appends
            moment = "training"
            wait_for(lambda: log_lines(run_dir) > before, proc)
            time.sleep(rng.uniform(0.0, 2.0) * step_seconds)
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return moment


@pytest.mark.soak
def test_kill_9_at_random_moments_every_checkpoint_loads_and_resume_is_exact(tiny_packed, tiny_preset, tmp_path):
    seed = int(os.environ.get("MINICODER_SOAK_SEED", "11"))
    rng = random.Random(seed)
    common = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--quiet", "--max-steps", str(STEPS),
              "--save-interval", "1", "--keep-checkpoints", "2", "--eval-interval", "100", "--log-interval", "100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(*common, "--out", str(straight), check=True)
    step_seconds = json.loads((straight / "summary.json").read_text())["seconds"] / STEPS

    moments, leftovers, torn = collections.Counter(), collections.Counter(), 0
    for _ in range(KILLS):
        moments[kill_at_random_moment([*common, "--out", str(killed), "--resume"], killed, step_seconds, rng)] += 1
        assert_every_checkpoint_loads(killed)
        for folder in (killed, killed / "checkpoints"):
            for name in hidden_entries(folder):
                leftovers[name.split(".")[-1].split("-")[0]] += 1  # tmp (mid-save), del (mid-rotation), old
        torn += torn_last_line(killed)

    steps_done = log_lines(killed)
    proc = run_cli(*common, "--out", str(killed), "--resume", check=True)
    assert losses(killed) == losses(straight)
    assert_every_checkpoint_loads(killed)
    assert not [p for p in [*killed.iterdir(), *(killed / "checkpoints").iterdir()] if p.name.startswith(".")]
    figures = {"seed": seed, "kills": KILLS, "aimed_at": dict(moments), "leftovers_seen": dict(leftovers),
               "torn_log_lines": torn, "steps": STEPS, "step_seconds": round(step_seconds, 3),
               "steps_logged_before_final_resume": steps_done,
               "final_resume_from": proc.stdout.split("resuming from ")[-1].split("\n")[0]}
    print("soak:", json.dumps(figures))
