"""Quality and size of every compression format on one trained model: held-out bits per byte of fp32, bf16,
int8, RTN int4, AWQ int4, KV int8 and KV int4; weights on disk and resident; KV bytes per token.

    .venv/bin/python benchmarks/quant_quality.py --model runs/demo/final --data runs/demo/data

Quality does not depend on timing, so this runs on a busy machine as well as on a quiet one. The int4
checkpoints are made with `minicoder quantize` (AWQ calibrated on the model's own training data) under
--work; the raw results go to OUT/quality-*.json (default runs/bench/), and `--render` (or
benchmarks/render.py) puts the table into docs/benchmarks.md. Widths that no int4 group size divides (the
nano preset's 688) stay in float in the checkpoints (--skip) and int8 with --quantize int4; the table says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from common import ROOT, Run, add_common_args


def resident_bytes(model_dir: Path, **config) -> int:
    """Weight bytes the serving engine holds (fused, packed) for this model and options."""
    from minicoder.engine import Engine, EngineConfig

    engine = Engine(model_dir, EngineConfig(max_num_seqs=1, num_blocks=1, **config))
    return engine.runner.weight_bytes()


def disk_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def indivisible(model_dir: Path, group: int) -> list[str]:
    cfg = json.loads((model_dir / "config.json").read_text())
    return ["down_proj"] if cfg["intermediate_size"] % group else []


def quantize(model_dir: Path, out: Path, method: str, group: int, skip: list[str], samples: int, seqlen: int,
             calib: Path | None) -> dict:
    from minicoder.cli import main

    args = ["quantize", str(model_dir), "--method", method, "--bits", "4", "--group-size", str(group),
            "--calib-samples", str(samples), "--calib-seqlen", str(seqlen), "--out", str(out), "--force"]
    args += [a for s in skip for a in ("--skip", s)] + (["--calib", str(calib)] if calib else [])
    if main(args) != 0:
        sys.exit(f"minicoder quantize {method} failed")
    return json.loads((out / "quantization.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "final")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "data", help="packed data (its val split)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", type=Path, help="calibration data (default: the model's training data)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, help="held-out windows (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "quant_quality")
    add_common_args(ap)
    args = ap.parse_args()
    run = Run("quality", args)

    from minicoder.engine.runner import kv_bytes_per_token
    from minicoder.eval.loss import heldout_loss
    from minicoder.model import ModelConfig

    args.work.mkdir(parents=True, exist_ok=True)
    skip = indivisible(args.model, args.group_size)
    awq_dir, rtn_dir = args.work / "awq4", args.work / "rtn4"
    awq = quantize(args.model, awq_dir, "awq", args.group_size, skip, args.calib_samples, args.calib_seqlen, args.calib)
    quantize(args.model, rtn_dir, "rtn", args.group_size, skip, args.calib_samples, args.calib_seqlen, args.calib)
    cfg = ModelConfig.from_hf_dict(json.loads((args.model / "config.json").read_text()))
    kept = f" ({', '.join(skip)} kept in fp16)" if skip else ""
    rows = [  # name, model dir, heldout_loss options, engine options, note
        ("fp32", args.model, {}, {}, ""),
        ("bf16", args.model, {"dtype": torch.bfloat16}, {"dtype": "bfloat16"}, ""),
        ("int8 (`--quantize int8`)", args.model, {"quantize": "int8"}, {"quantize": "int8"}, "per-channel RTN at load"),
        ("RTN int4 (`quantize --method rtn`)", rtn_dir, {}, {}, f"group {args.group_size}{kept}"),
        ("AWQ int4 (`quantize --method awq`)", awq_dir, {}, {}, f"group {args.group_size}{kept}, "
         f"{awq['calibration']['samples']}x{awq['calibration']['seqlen']} calibration tokens"),
        ("KV int8 (`--kv-cache-dtype int8`)", args.model, {"kv_cache_dtype": "int8"}, {"kv_cache_dtype": "int8"}, "fp32 weights"),
        ("KV int4 (`--kv-cache-dtype int4`)", args.model, {"kv_cache_dtype": "int4"}, {"kv_cache_dtype": "int4"}, "fp32 weights"),
    ]
    results = []
    for name, model_dir, loss_options, engine_options, note in rows:
        scores = heldout_loss(model_dir, args.data, max_windows=args.max_windows, **loss_options)
        kv = engine_options.get("kv_cache_dtype", "auto")
        dtype = torch.bfloat16 if engine_options.get("dtype") == "bfloat16" else torch.float32
        results.append({"format": name, "note": note, "bits_per_byte": scores["bits_per_byte"], "loss": scores["loss"],
                        "disk_bytes": disk_bytes(model_dir) if not loss_options.get("quantize") else None,
                        "resident_bytes": resident_bytes(model_dir, **engine_options),
                        "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype, kv), "windows": scores["windows"]})
        print(f"{name}: {scores['bits_per_byte']:.4f} bits/byte", flush=True)
    for r in results:
        r["vs_fp32_pct"] = 100 * (r["bits_per_byte"] / results[0]["bits_per_byte"] - 1)
    errors = awq["layer_errors"]
    print(f"AWQ's scale search lowered the calibration output error against RTN in "
          f"{sum(g['awq_mse'] < g['rtn_mse'] for g in errors)} of {len(errors)} Linear groups")
    run.save({"model": str(args.model), "data": str(args.data), "group_size": args.group_size,
              "calibration": awq["calibration"], "awq_layer_errors": errors, "formats": results})
    shutil.rmtree(args.work / ".tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
