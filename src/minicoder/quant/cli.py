"""`minicoder quantize MODEL --method awq|rtn --bits 4|8 --out DIR`: a quantized model directory.

    minicoder quantize runs/demo/final --method awq --bits 4 --group-size 128 --out runs/demo/awq4

Checks everything it can before computing (method and bits, an already-quantized model, group sizes against
every width, the calibration data), writes atomically, and ends with one summary line: time, size on disk,
calibration loss of the float and the quantized model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import MinicoderError

METHODS = ("awq", "rtn")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help="a floating-point model directory")
    p.add_argument("--method", required=True, help="awq (activation-aware, calibrated) or rtn (round to nearest)")
    p.add_argument("--bits", type=int, required=True, help="4 (awq, rtn: group-wise int4) or 8 (rtn: per-channel int8)")
    p.add_argument("--group-size", type=int, default=128, help="int4 inputs per scale/zero: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--calib", type=Path, help="calibration data: a packed data dir or a corpus dir "
                   "(default: the data the model was trained on)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--no-clip", action="store_true", help="awq: skip the weight-clipping search")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="keep Linears whose name contains NAME in float (repeatable; e.g. down_proj)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_not_quantized(model_dir: Path, hf_config: dict) -> None:
    if hf_config.get("quantization_config"):
        raise MinicoderError(f"{model_dir}: the model is already quantized "
                             f"({hf_config['quantization_config'].get('quant_method')}); quantize its float original")


def _check_args(args, model) -> set[str]:
    """Argument errors that need the model; returns the full names of the Linears kept in float."""
    from .apply import linear_names
    from .checkpoint import is_skipped
    from .rtn import check_group_size

    names = linear_names(model)
    skipped = {n for n in names if is_skipped(n, set(args.skip))}
    unused = [s for s in args.skip if not any(s in n for n in names)]
    if unused:
        raise MinicoderError(f"--skip {unused[0]}: no Linear of the model has that in its name")
    if args.bits == 4:
        for name in names:
            if name not in skipped:
                width = model.get_submodule(name).in_features
                try:
                    check_group_size(width, args.group_size, name)
                except MinicoderError as e:
                    raise MinicoderError(f"{e}; pick a --group-size that divides it, or keep it in float with "
                                         f"--skip {name.rsplit('.', 1)[1]}") from None
    return skipped


def run(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from ..data.io import atomic_output_dir
    from ..model import LlamaForCausalLM
    from .apply import install, linear_names, weight_bytes
    from .awq import awq_quantize, calibration_loss
    from .calib import calibration_tokens
    from .checkpoint import quantization_config, save_quantized
    from .rtn import quantize_int4, quantize_int8

    if args.method not in METHODS:
        raise MinicoderError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if args.bits not in (4, 8):
        raise MinicoderError(f"--bits must be 4 or 8, got {args.bits}")
    if args.method == "awq" and args.bits != 4:
        raise MinicoderError("--method awq is 4-bit (W4A16); for 8 bits use --method rtn --bits 8")
    if not (args.model / "config.json").is_file():
        raise MinicoderError(f"{args.model}: not a model directory (no config.json)")
    if args.out.exists() and not args.force:
        raise MinicoderError(f"{args.out}: already exists (pass --force to replace it)")
    hf_config = json.loads((args.model / "config.json").read_text())
    start = time.time()
    _check_not_quantized(args.model, hf_config)
    model = LlamaForCausalLM.from_pretrained(args.model)
    skipped = _check_args(args, model)
    tokens = source = None
    if args.method == "awq" or args.calib:
        tokens, source = calibration_tokens(args.model, args.calib, args.calib_samples, args.calib_seqlen)
    float_bytes = weight_bytes(model)
    loss_tokens = tokens[:16] if tokens is not None else None  # the calibration loss is measured on a subset
    float_loss = calibration_loss(model, loss_tokens) if loss_tokens is not None else None

    groups = []
    torch.manual_seed(0)
    if args.method == "awq":
        result = awq_quantize(model, tokens, args.group_size, skip=skipped, clip=not args.no_clip,
                              progress=not args.quiet)
        weights, groups = result.weights, result.groups
    else:
        quantize = (lambda w: quantize_int4(w, args.group_size)) if args.bits == 4 else quantize_int8
        names = [n for n in linear_names(model) if n not in skipped]
        weights = {n: quantize(model.get_submodule(n).weight.detach())
                   for n in tqdm(names, desc=f"rtn int{args.bits}", unit="linear", disable=args.quiet)}

    summary = {"method": args.method, "bits": args.bits, "group_size": args.group_size if args.bits == 4 else None,
               "source_model": str(args.model.resolve()), "skipped": sorted(skipped),
               "calibration": {"source": str(source), "samples": len(tokens), "seqlen": tokens.shape[1],
                               "clip": not args.no_clip} if tokens is not None else None,
               "layer_errors": [{"layer": g.layer, "linears": [n.rsplit(".", 1)[1] for n in g.names],
                                 "ratio": g.ratio, "rtn_mse": g.rtn_error, "awq_mse": g.awq_error} for g in groups]}
    qconfig = quantization_config(args.bits, args.group_size if args.bits == 4 else None,
                                  sorted({n.rsplit(".", 1)[1] for n in skipped}))
    with atomic_output_dir(args.out, force=args.force) as tmp:
        # the model's float tensors (norms with AWQ's scales folded in, embeddings) are saved beside the codes
        save_quantized(model, weights, args.model, tmp, hf_config, qconfig, summary)
        install(model, weights)
        if loss_tokens is not None:
            summary["calibration_loss"] = {"float": float_loss, "quantized": calibration_loss(model, loss_tokens)}
        summary.update(seconds=round(time.time() - start, 1), bytes_on_disk=sum(f.stat().st_size for f in tmp.iterdir()),
                       float_weight_bytes=float_bytes, quantized_weight_bytes=weight_bytes(model))
        (tmp / "quantization.json").write_text(json.dumps(summary, indent=2) + "\n")
    loss = summary.get("calibration_loss")
    print(f"quantized {len(weights)} Linears ({args.method} int{args.bits}"
          + (f", group {args.group_size}" if args.bits == 4 else "") + (f", {len(skipped)} kept in float" if skipped else "")
          + f") in {summary['seconds']}s: {summary['bytes_on_disk'] / 1e6:.2f} MB on disk"
          + (f", calibration loss {loss['float']:.4f} -> {loss['quantized']:.4f} nats/token" if loss else "")
          + f" -> {args.out}")
