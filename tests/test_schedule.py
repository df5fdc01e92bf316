"""Learning-rate schedules: cosine as before, warmup-stable-decay holds the peak and decays at the end."""

from __future__ import annotations

import math

import pytest

from minicoder.config import TrainConfig
from minicoder.train.schedule import lr_at

from conftest import run_cli


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:80])  # stable: stopping here loses nothing
    assert lrs[-1] == pytest.approx(1e-4) and all(a > b for a, b in zip(lrs[79:], lrs[80:]))
    anneal = TrainConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=0, max_steps=50, schedule="wsd", decay_fraction=1.0)
    assert lr_at(0, anneal) < 1e-3 and lr_at(49, anneal) == pytest.approx(0.0)  # the annealing stage: decay only


def test_cosine_is_unchanged():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(10, cfg) == pytest.approx(1e-3) and lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)


def test_unknown_schedule_is_a_clear_error(tiny_packed, tiny_preset, tmp_path):
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(tmp_path / "r"),
                   "--schedule", "linear", "--quiet")
    assert proc.returncode == 2 and "schedule" in proc.stderr and "Traceback" not in proc.stderr
