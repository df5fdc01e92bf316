"""Training under faults: a SIGKILL during checkpoint rotation or while `final/` is replaced, a torn log line,
a truncated newest checkpoint, leftovers of killed runs. Each ends in loadable checkpoints and a working resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli
from minicoder.data.io import atomic_output_dir
from minicoder.model import LlamaForCausalLM
from minicoder.train.checkpoint import list_checkpoints, load_trainer_state


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_every_checkpoint_loads(run_dir: Path) -> None:
    """What a user relies on after any crash: each checkpoint under a real name is whole."""
    for _, path in list_checkpoints(run_dir):
        assert load_trainer_state(path)["step"] == int(path.name.split("-")[1])
        LlamaForCausalLM.from_pretrained(path)
    if (run_dir / "final").exists():
        LlamaForCausalLM.from_pretrained(run_dir / "final")


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# Runs the CLI with one file-system call patched to SIGKILL the process at a chosen moment, the way a kill -9
# (OOM killer, preemption) lands while a checkpoint is rotated or `final/` is replaced.
KILLING_CLI = textwrap.dedent("""
    import os, runpy, shutil, signal, sys
    from pathlib import Path

    where = sys.argv.pop(1)
    real_rmtree, real_rename = shutil.rmtree, os.rename

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if where == "rotation" and "step-000002" in path.name and (path / "trainer_state.pt").exists():
            (path / "trainer_state.pt").unlink()  # deletion has begun
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if where == "final" and Path(dst).name == "final":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kwargs)

    shutil.rmtree, os.rename = rmtree, rename
    if where == "final":
        import minicoder.data.io as io
        io._exchange = lambda a, b: False  # the file systems without renameat2: two renames
    sys.argv = ["minicoder", *sys.argv[1:]]
    runpy.run_module("minicoder", run_name="__main__")
""")


def run_killed(where: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLING_CLI, where, *args], capture_output=True, text=True,
                          timeout=600)


def test_kill_during_rotation_leaves_whole_checkpoints_and_resume_works(tiny_packed, tiny_preset, tiny_trained, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--quiet",
            "--save-interval", "2"]
    proc = run_killed("rotation", *args)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed while deleting step-2 after saving step-6
    assert [p.name for _, p in list_checkpoints(out)] == ["step-000004", "step-000006"]
    assert_every_checkpoint_loads(out)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers and all(".del-" in name for name in leftovers)

    proc = run_cli(*args, "--resume", check=True)
    assert "resuming from" in proc.stdout and "step 6" in proc.stdout
    assert "removed 1 temporary directory" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert losses(out) == losses(tiny_trained)
    assert_every_checkpoint_loads(out)


def test_kill_while_final_is_replaced_keeps_a_final(tiny_packed, tiny_preset, tiny_trained, tmp_path):
    """Without an atomic swap, `final/` is renamed aside first; a kill before the new one arrives is undone at the
    next start. With the swap (the default on Linux) there is no such moment at all."""
    out = tmp_path / "run"
    shutil.copytree(tiny_trained, out)
    before = (out / "final" / "model.safetensors").read_bytes()
    args = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--quiet",
            "--resume", "--max-steps", "10", "--save-interval", "2"]
    proc = run_killed("final", *args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".final.old-")]  # the previous final, whole

    proc = run_cli(*args, check=True)  # 10 steps are done: this resume only tidies up and rewrites final/
    assert "restored" in proc.stderr and "final" in proc.stderr
    assert json.loads((out / "final" / "minicoder.json").read_text())["steps"] == 10  # finished by the resume
    assert (out / "final" / "model.safetensors").read_bytes() != before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert_every_checkpoint_loads(out)


def test_final_is_swapped_atomically(tiny_packed, tiny_preset, tiny_trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_trained, out)
    args = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--quiet",
            "--resume", "--max-steps", "10", "--save-interval", "2"]
    proc = subprocess.run([sys.executable, "-c", KILLING_CLI.replace('if where == "final":\n', "if False:\n"),
                           "final", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # no rename onto final/ happened: it was one exchange
    assert json.loads((out / "final" / "minicoder.json").read_text())["steps"] == 10


def test_torn_last_log_line_is_dropped_and_resume_reproduces_the_run(tiny_packed, tiny_preset, tiny_trained, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--quiet"]
    run_cli(*args, "--stop-after", "4", check=True)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 6.1')  # killed mid-write
    proc = run_cli(*args, "--resume", check=True)
    assert "log.jsonl:5: dropping a torn last line" in proc.stderr
    assert losses(out) == losses(tiny_trained)


def test_bad_log_line_before_the_end_is_a_clear_error(tiny_packed, tiny_preset, tiny_trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_trained, out)
    lines = (out / "log.jsonl").read_text().splitlines()
    lines[2] = "garbage"
    (out / "log.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out),
                   "--resume", "--quiet")
    assert proc.returncode == 2 and "log.jsonl:3" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("broken", ["trainer_state.pt", "model.safetensors"])
def test_resume_falls_back_past_a_truncated_newest_checkpoint(broken, tiny_packed, tiny_preset, tiny_trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_trained, out)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    newest = out / "checkpoints" / "step-000008" / broken
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--resume",
                   "--quiet", check=True)
    assert f"step-000008/{broken}" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert "resuming from" in proc.stdout and "step 4" in proc.stdout
    assert losses(out) == losses(tiny_trained)
    assert (out / "checkpoints" / "step-000008.unloadable").is_dir()  # kept for inspection, out of rotation
    assert_every_checkpoint_loads(out)


def test_resume_without_checkpoint_says_it_starts_fresh(tiny_packed, tiny_preset, tmp_path):
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(tmp_path / "r"),
                   "--resume", "--max-steps", "2", "--quiet", check=True)
    assert "no checkpoint in" in proc.stderr and "starting a fresh run" in proc.stderr
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tiny_packed, tiny_preset, tmp_path):
    out = tmp_path / "run"
    dead, live = dead_pid(), os.getppid()  # the parent process: alive, and not the run's own PID
    for name in (f".step-000010.tmp-{dead}", f".step-000002.del-{dead}", f".final.tmp-{dead}", f".step-000004.tmp-{live}"):
        leftover = out / "checkpoints" / name if name.startswith(".step") else out / name
        leftover.mkdir(parents=True)
        (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    (out / f".log.jsonl.tmp-{dead}").write_text("{}")  # a file: killed while the log was rewritten on resume
    (out / "checkpoints" / f".notes.tmp-{dead}").mkdir()  # not a name training writes: left alone
    run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(out), "--resume",
            "--max-steps", "2", "--quiet", check=True)
    hidden = sorted(p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith("."))
    assert hidden == [f".notes.tmp-{dead}", f".step-000004.tmp-{live}"]


def test_atomic_outputs_remove_leftovers_of_dead_runs(tmp_path):
    """`data corpus`, `data pack`, `data sft` write through atomic_output_dir: their killed runs' temp dirs go."""
    dead = dead_pid()
    (tmp_path / f".corpus.tmp-{dead}" / "docs").mkdir(parents=True)
    (tmp_path / f".corpus.del-{dead}").mkdir()
    (tmp_path / f".data.tmp-{dead}").mkdir()  # another output's leftover: that output's next run removes it
    with atomic_output_dir(tmp_path / "corpus") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".data.tmp-{dead}", "corpus"]
    assert (tmp_path / "corpus" / "meta.json").is_file()


def test_atomic_output_killed_between_renames_is_restored(tmp_path):
    dead = dead_pid()
    (tmp_path / f".corpus.old-{dead}").mkdir()
    (tmp_path / f".corpus.old-{dead}" / "meta.json").write_text('{"previous": true}')
    (tmp_path / f".corpus.tmp-{dead}").mkdir()
    with pytest.raises(Exception, match="already exists"):
        with atomic_output_dir(tmp_path / "corpus"):
            pass
    assert json.loads((tmp_path / "corpus" / "meta.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
