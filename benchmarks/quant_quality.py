"""Quality and size of every compression format on one trained model: held-out bits per byte of fp32, bf16,
int8, RTN int4, AWQ int4, KV int8 and KV int4; weights on disk and resident; KV bytes per token.

    .venv/bin/python benchmarks/quant_quality.py --model runs/demo/final --data runs/demo/data

Quality does not depend on timing, so this runs on a busy machine as well as on a quiet one. The int4
checkpoints are made with `minicoder quantize` (AWQ calibrated on the model's own training data) under
--work; the JSON goes to --json and the table into docs/benchmarks.md (section "## Compression: quality
and size"). Widths that no int4 group size divides (the nano preset's 688) stay in float in the
checkpoints (--skip) and int8 with --quantize int4; the table says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Compression: quality and size"


def write_section(text: str, out: Path, section: str = SECTION) -> None:
    """Replace (or append) `section` of the Markdown file `out`, up to the next "## " heading."""
    existing = out.read_text() if out.exists() else "# Benchmarks\n\n"
    start = existing.find(section + "\n")
    if start >= 0:
        end = existing.find("\n## ", start + 1)
        existing = existing[:start] + existing[end + 1 if end >= 0 else len(existing):]
    out.write_text(existing.rstrip("\n") + "\n\n" + text)


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
    ap.add_argument("--json", type=Path, default=ROOT / "build" / "quant_quality" / "results.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from minicoder.engine.runner import kv_bytes_per_token
    from minicoder.eval.loss import heldout_loss
    from minicoder.model import ModelConfig

    started = time.time()
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
    base = results[0]["bits_per_byte"]
    info = {"model": str(args.model), "data": str(args.data), "seconds": round(time.time() - started),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "awq_layer_errors": awq["layer_errors"],
            "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2) + "\n")

    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"  # noqa: E731
    lines = [SECTION, "",
             f"`benchmarks/quant_quality.py --model {args.model} --data {args.data}` on {info['date']} "
             f"({info['seconds']} s; {results[0]['windows']} held-out windows of the validation split). Bits per byte "
             "of the held-out repositories (lower is better); weights on disk = the model directory's safetensors; "
             "resident = what the serving engine holds (fused, packed for this CPU's kernels); KV bytes per token over "
             "all layers.", "",
             "| format | bits/byte | vs fp32 | weights on disk (MB) | resident (MB) | KV bytes/token | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['format']} | {r['bits_per_byte']:.4f} | {100 * (r['bits_per_byte'] / base - 1):+.2f}% | "
                     f"{mb(r['disk_bytes'])} | {mb(r['resident_bytes'])} | {r['kv_bytes_per_token']:,} | {r['note']} |")
    errors = awq["layer_errors"]
    better = sum(g["awq_mse"] < g["rtn_mse"] for g in errors)
    lines += ["", f"AWQ's scale search lowered the calibration output error against RTN in {better} of {len(errors)} "
              f"Linear groups (total MSE {sum(g['awq_mse'] for g in errors):.3g} vs {sum(g['rtn_mse'] for g in errors):.3g}). "
              "Aims: AWQ int4 within 2% of fp32 and better than RTN int4; KV int8 within 0.5%.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text, args.out)
    shutil.rmtree(args.work / ".tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
