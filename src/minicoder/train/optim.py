"""Optimizers for the training loop: AdamW (the default), or Muon for the hidden weight matrices + AdamW for the rest.

`optimizer = "muon"` follows the usual split (Keller Jordan's Muon, Moonshot's "Muon is Scalable"): every 2-D
weight inside the transformer blocks (attention q/k/v/o, MLP gate/up/down) gets `torch.optim.Muon` --
momentum orthogonalized by Newton-Schulz -- while the embeddings, the LM head (tied or not), norms and biases stay
on AdamW. Muon runs with `adjust_lr_fn="match_rms_adamw"` (update RMS scaled to AdamW's, 0.2 * sqrt(max(A, B))),
so both optimizers share one learning rate, schedule and weight decay: `--optimizer muon` needs no retuning.

Checkpoints: an AdamW run stores AdamW's own state dict (as before this option existed, so old checkpoints
resume unchanged); a Muon run stores {"muon": ..., "adamw": ...}. Resuming with the other optimizer is an error.
"""

from __future__ import annotations

import torch

from ..errors import MinicoderError

OPTIMIZERS = ("adamw", "muon")
ADAMW_ONLY = ("embed_tokens", "lm_head")  # 2-D, but lookup tables / the output layer: not for Muon


def _adamw(params, cfg) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass over memory: ~4x faster than foreach on CPU.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class MuonWithAdamW:
    """Two torch optimizers stepped as one (torch has no combinator for this): the loop sets the learning rate
    through `param_groups` (both optimizers' groups), steps, zeroes gradients and checkpoints it like any optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: load_state_dict replaces an optimizer's group dicts with new ones.
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def muon_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """(hidden 2-D matrices for Muon, everything else for AdamW), trainable parameters only."""
    muon, rest = [], []
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if p.requires_grad:
            (muon if p.dim() == 2 and not any(part in name for part in ADAMW_ONLY) else rest).append(p)
    return muon, rest


def build_optimizer(model: torch.nn.Module, cfg):
    if cfg.optimizer not in OPTIMIZERS:
        raise MinicoderError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.optimizer == "adamw":
        return _adamw([p for p in model.parameters() if p.requires_grad], cfg)
    matrices, rest = muon_parameters(model)
    if not matrices:
        raise MinicoderError("optimizer muon: the model has no hidden weight matrices to apply it to")
    muon = torch.optim.Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                            adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, _adamw(rest, cfg))


def load_optimizer_state(optimizer, state: dict, cfg, checkpoint) -> None:
    """Restore a checkpoint's optimizer state; one written by the other optimizer is a clear error."""
    saved = state.get("settings", {}).get("train", {}).get("optimizer", "adamw")  # older checkpoints: AdamW
    if saved != cfg.optimizer:
        raise MinicoderError(f"{checkpoint}: was trained with optimizer {saved}, this run asks for {cfg.optimizer}; "
                             f"resume with --optimizer {saved}, or start a new run from it with --init")
    optimizer.load_state_dict(state["optimizer"])
