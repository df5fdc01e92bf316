"""`minicoder recipe`: every stage runs at a toy size, stops where asked, resumes (an interrupted training stage
from its checkpoint), records its wall time, and ends with a model card holding the scores."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

from minicoder.recipe import STAGES

from conftest import TINY_PRESET, run_cli

SFT_PRESET = """
[train]
seq_len = 128
batch_size = 4
max_steps = 4
lr = 1e-3
warmup_steps = 1
eval_interval = 2
eval_batches = 1
save_interval = 2
"""

RECIPE = """
[corpus]
sources = ["{src}"]
[tokenizer]
vocab_size = 600
[pretrain]
config = "tiny.toml"
overrides = {{ max_steps = 6, warmup_steps = 2 }}
[tasks]
exercises = 40
replay = 0.5
[anneal]
overrides = {{ max_steps = 4, save_interval = 2 }}
[sft]
config = "sft.toml"
exercises = 30
max_pairs = 200
[eval]
limit = 1
n_samples = 2
"""


def make_recipe(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("bisect", "colorsys", "keyword", "heapq", "textwrap", "fnmatch", "glob", "shlex", "string", "copy"):
        (src / name).mkdir(parents=True)
        shutil.copy(stdlib / f"{name}.py", src / name / f"{name}.py")
    (tmp_path / "tiny.toml").write_text(TINY_PRESET)
    (tmp_path / "sft.toml").write_text(SFT_PRESET)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(src=src))
    return recipe


def test_recipe_runs_in_sittings_and_resumes_every_stage(tmp_path):
    recipe, out = make_recipe(tmp_path), tmp_path / "model"
    proc = run_cli("recipe", str(recipe), "--out", str(out), "--stop-after", "pretrain", check=True)
    assert "stopped after pretrain" in proc.stdout
    state = json.loads((out / "recipe.json").read_text())
    assert list(state["stages"]) == list(STAGES[: STAGES.index("pretrain") + 1])
    assert (out / "pretrain" / "final").is_dir() and not (out / "anneal").exists()
    assert (out / "pretrain" / "settings.json").is_file()
    assert json.loads((out / "data" / "meta.json").read_text())["fim"]["window"] == 32  # packed for the preset's seq_len

    proc = run_cli("recipe", str(recipe), "--out", str(out))
    assert proc.returncode == 2 and "--resume" in proc.stderr

    proc = run_cli("recipe", str(recipe), "--out", str(out), "--resume", "--stop-after", "anneal", check=True)
    assert "== pack: done earlier" in proc.stdout and "== anneal" in proc.stdout
    anneal_info = json.loads((out / "anneal" / "final" / "minicoder.json").read_text())
    pretrain_info = json.loads((out / "pretrain" / "final" / "minicoder.json").read_text())
    assert anneal_info["tokens_trained"] > pretrain_info["tokens_trained"]  # it continued from the pretrained model
    # The anneal decays from the pretraining rate: pretraining's warmup override must not warm it up again from 0.
    anneal_train = json.loads((out / "anneal" / "settings.json").read_text())["train"]
    assert (anneal_train["warmup_steps"], anneal_train["decay_fraction"]) == (0, 1.0)

    # An anneal interrupted after its step-2 checkpoint: the next sitting continues it, not restarts it.
    state = json.loads((out / "recipe.json").read_text())
    state["stages"]["anneal"] = {"done": False, "seconds": 1.0}
    (out / "recipe.json").write_text(json.dumps(state))
    shutil.rmtree(out / "anneal" / "final")
    shutil.rmtree(out / "anneal" / "checkpoints" / "step-000004")
    proc = run_cli("recipe", str(recipe), "--out", str(out), "--resume", check=True)
    assert "resuming from" in proc.stdout and "recipe done" in proc.stdout

    state = json.loads((out / "recipe.json").read_text())
    assert list(state["stages"]) == list(STAGES) and all(s["done"] for s in state["stages"].values())
    assert state["stages"]["anneal"]["seconds"] > 1.0  # both sittings counted
    card = (out / "MODEL_CARD.md").read_text()
    assert "| base | infill |" in card and "| instruct | humaneval |" in card and "pass@1 greedy" in card
    assert "| pretrain |" in card and "Reproduce" in card
    assert "`minicoder eval humaneval " in card and "--protocol standard" in card  # each score with its command

    # The finished run ships as the default model: bf16 base + instruct and the same card, its links rewritten.
    run_cli("export", "ship", str(out), "--out", str(tmp_path / "shipped"), check=True)
    shipped = (tmp_path / "shipped" / "MODEL_CARD.md").read_text()
    assert "| instruct | humaneval |" in shipped and "![pretrain loss](figures/pretrain_loss.png)" in shipped
    assert json.loads((tmp_path / "shipped" / "instruct" / "minicoder.json").read_text())["stage"] == "sft"
    assert (out / "results.md").read_text().count("\n| 20") == 3 + 2 + 2
