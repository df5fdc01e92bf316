"""The default model: `minicoder export ship` writes it from a recipe run (bf16, card), and the commands find it
with no model argument ($MINICODER_MODEL or the checkout's models/ folder), or say how to get one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli


@pytest.fixture(scope="module")
def recipe_run(tiny_trained, tiny_packed, tmp_path_factory):
    """A recipe output folder with its two finished models (the tiny run stands in for both) and one evaluation."""
    run = tmp_path_factory.mktemp("recipe") / "run"
    for stage in ("anneal", "sft"):
        shutil.copytree(tiny_trained / "final", run / stage / "final")
        shutil.copy2(tiny_trained / "loss.png", run / stage / "loss.png")
    (run / "recipe.json").write_text(json.dumps({"recipe": "configs/recipe_tiny.toml", "stages": {
        "anneal": {"done": True, "seconds": 1.5}, "sft": {"done": True, "seconds": 2.5}}}))
    run_cli("eval", "loss", str(run / "anneal" / "final"), "--data", str(tiny_packed), "--max-windows", "4",
            "--out", str(run / "eval" / "base" / "loss"), check=True)
    return run


@pytest.fixture(scope="module")
def shipped(recipe_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ship") / "minicoder-small"
    proc = run_cli("export", "ship", str(recipe_run), "--out", str(out), check=True)
    assert "shipped: base + instruct in bf16" in proc.stdout
    return out


def test_ship_writes_bf16_models_whose_logits_match_fp32(recipe_run, shipped):
    from safetensors import safe_open

    from minicoder.model import LlamaForCausalLM

    ids = torch.arange(3, 40).unsqueeze(0)
    for kind, source in (("base", "anneal"), ("instruct", "sft")):
        with safe_open(shipped / kind / "model.safetensors", "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert json.loads((shipped / kind / "config.json").read_text())["torch_dtype"] == "bfloat16"
        info = json.loads((shipped / kind / "minicoder.json").read_text())
        assert info["dtype"] == "bfloat16" and info["stage"] == "pretrain" and info["tokens_trained"] > 0
        assert (shipped / kind / "tokenizer.json").is_file()
        with torch.no_grad():
            fp32 = LlamaForCausalLM.from_pretrained(recipe_run / source / "final")(ids)
            bf16 = LlamaForCausalLM.from_pretrained(shipped / kind)(ids)  # bf16 weights, fp32 compute
        assert not torch.equal(fp32, bf16)  # the weights really were rounded
        torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.03 * fp32.abs().max().item())
        assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9


def test_ship_writes_the_card_with_scores_commands_and_figures(shipped):
    card = (shipped / "MODEL_CARD.md").read_text()
    assert "`minicoder recipe tiny --out" in card and "base model `base`" in card and "instruct model `instruct`" in card
    assert "| base | loss | loss " in card and "`minicoder eval loss " in card  # the score and its command
    assert "![anneal loss](figures/anneal_loss.png)" in card and (shipped / "figures" / "anneal_loss.png").is_file()
    assert "minicoder export ship" in card and "| sft | 2.5 |" in card


def test_ship_refuses_an_unfinished_run_and_an_existing_dir(recipe_run, shipped, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(recipe_run, partial, ignore=shutil.ignore_patterns("sft"))
    proc = run_cli("export", "ship", str(partial), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "sft/final: missing" in proc.stderr and not (tmp_path / "out").exists()
    proc = run_cli("export", "ship", str(recipe_run), "--out", str(shipped))
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


def test_commands_use_the_default_model_from_the_environment(shipped):
    env = {"MINICODER_MODEL": str(shipped)}
    base = run_cli("generate", "--prompt", "def f(x):", "--max-new-tokens", "4", env=env, check=True)
    explicit = run_cli("generate", str(shipped / "base"), "--prompt", "def f(x):", "--max-new-tokens", "4", check=True)
    assert base.stdout == explicit.stdout
    proc = run_cli("eval", "infill", "--limit", "1", "--out", str(shipped.parent / "infill"), env=env, check=True)
    summary = json.loads((shipped.parent / "infill" / "infill_summary.json").read_text())
    assert summary["model"] == str(shipped / "base") and "exact match" in proc.stdout
    # A model directory in $MINICODER_MODEL serves every command, whatever its kind.
    one = run_cli("generate", "--prompt", "def f(x):", "--max-new-tokens", "4", env={"MINICODER_MODEL": str(shipped / "base")})
    assert one.stdout == explicit.stdout


def test_default_resolution_and_the_missing_default_error(shipped, tmp_path, monkeypatch, capsys):
    from minicoder import shipped as defaults
    from minicoder.cli import main
    from minicoder.errors import MinicoderError

    monkeypatch.delenv("MINICODER_MODEL", raising=False)
    monkeypatch.setattr(defaults, "MODELS_DIR", shipped.parent)  # a checkout whose models/ holds the shipped copy
    assert defaults.default_model("instruct") == str(shipped / "instruct")
    assert defaults.resolve_model(None, "base") == str(shipped / "base")
    assert defaults.resolve_model("elsewhere", "base") == "elsewhere"
    assert defaults.served_name(shipped / "instruct") == "minicoder-small-instruct"

    monkeypatch.setattr(defaults, "MODELS_DIR", tmp_path / "models")  # an installed wheel: no weights
    with pytest.raises(MinicoderError, match="make model"):
        defaults.default_model("base")
    for argv in (["generate", "--prompt", "x"], ["serve"], ["eval", "humaneval"], ["agent", "What is 2**10?"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: no model given") and "$MINICODER_MODEL" in err and "Traceback" not in err
    monkeypatch.setenv("MINICODER_MODEL", str(tmp_path / "nowhere"))
    assert main(["chat"]) == 2 and "$MINICODER_MODEL=" in capsys.readouterr().err
