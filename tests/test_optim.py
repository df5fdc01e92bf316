"""`--optimizer muon`: Muon on the hidden matrices, AdamW on the rest; it trains, and resumes exactly."""

from __future__ import annotations

import json

import torch

from conftest import run_cli


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_split_puts_only_hidden_matrices_on_muon():
    from minicoder.config import TrainConfig
    from minicoder.model import LlamaForCausalLM, ModelConfig
    from minicoder.train.optim import MuonWithAdamW, build_optimizer

    model = LlamaForCausalLM(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    on_adamw = sorted(names[id(p)] for g in opt.adamw.param_groups for p in g["params"])
    assert len(on_muon) == 2 * 7 and all(n.startswith("model.layers.") and "norm" not in n for n in on_muon)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(on_adamw)
    assert not set(on_muon) & set(on_adamw) and len(on_muon) + len(on_adamw) == len(names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.tensor([[1, 2, 3, 4]])).logsumexp(-1).sum().backward()
    opt.step()
    assert all("momentum_buffer" in opt.muon.state[p] for g in opt.muon.param_groups for p in g["params"])
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # Muon and AdamW both stepped
    assert isinstance(build_optimizer(model, TrainConfig()), torch.optim.AdamW)  # the default is unchanged
    opt.load_state_dict(opt.state_dict())  # as --resume does: torch replaces each optimizer's group dicts
    for group in opt.param_groups:
        group["lr"] = 0.123  # the loop's schedule
    assert all(g["lr"] == 0.123 for o in (opt.muon, opt.adamw) for g in o.param_groups)


def test_muon_trains_and_resumes_exactly(tiny_packed, tiny_preset, tmp_path):
    # Muon's update RMS matches AdamW's steady state (0.2), smaller than AdamW's first steps: 8 steps need a higher lr.
    args = ["pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--quiet", "--lr", "1e-2",
            "--optimizer", "muon"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli(*args, "--out", str(straight), check=True)
    log = losses(straight)
    assert log[-1]["loss"] < log[0]["loss"] - 0.15, [r["loss"] for r in log]  # AdamW at 3e-3: -0.27
    state = torch.load(straight / "checkpoints" / "step-000008" / "trainer_state.pt", weights_only=False)
    assert set(state["optimizer"]) == {"muon", "adamw"} and state["settings"]["train"]["optimizer"] == "muon"

    run_cli(*args, "--out", str(interrupted), "--stop-after", "4", check=True)
    proc = run_cli(*args, "--out", str(interrupted), "--resume", check=True)
    assert "resuming from" in proc.stdout
    assert [r["loss"] for r in losses(interrupted)] == [r["loss"] for r in log]
    assert [r.get("val_loss") for r in losses(interrupted)] == [r.get("val_loss") for r in log]

    # A Muon checkpoint does not resume under the default AdamW (nor an AdamW one as Muon): the error says so.
    proc = run_cli(*args[:-2], "--out", str(interrupted), "--resume", "--max-steps", "12")
    assert proc.returncode == 2 and "optimizer muon" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_optimizer_is_named(tiny_packed, tiny_preset, tmp_path):
    proc = run_cli("pretrain", "--config", str(tiny_preset), "--data", str(tiny_packed), "--out", str(tmp_path / "r"),
                   "--optimizer", "sgd", "--quiet")
    assert proc.returncode == 2 and "optimizer must be one of adamw, muon" in proc.stderr


def test_checkpoint_from_before_the_option_resumes_as_adamw(tmp_path):
    """Trainer states written before `optimizer` was a setting hold AdamW's state dict and no such key."""
    from minicoder.config import TrainConfig
    from minicoder.errors import MinicoderError
    from minicoder.model import LlamaForCausalLM, ModelConfig
    from minicoder.train.optim import build_optimizer, load_optimizer_state

    model = LlamaForCausalLM(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    old = build_optimizer(model, TrainConfig())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    old.step()
    state = {"optimizer": old.state_dict(), "settings": {"train": {"lr": 1e-3}}}
    fresh = build_optimizer(model, TrainConfig())
    load_optimizer_state(fresh, state, TrainConfig(), tmp_path)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], old.state_dict()["state"][0]["exp_avg"])
    try:
        load_optimizer_state(build_optimizer(model, TrainConfig(optimizer="muon")), state, TrainConfig(optimizer="muon"), tmp_path)
    except MinicoderError as e:
        assert "trained with optimizer adamw" in str(e)
    else:
        raise AssertionError("a Muon run resumed from an AdamW checkpoint")
