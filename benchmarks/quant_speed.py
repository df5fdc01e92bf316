"""Batch-1 decode tok/s of each weight format against llama.cpp at the same bit width, in one run:
minicoder fp32 / int8 / int4 (`--quantize`, the packed CPU kernels) vs llama.cpp f32 / q8_0 / q4_0
(llama-cpp-python in process, GGUF from `minicoder export gguf`), on the demo model and a ~200M random Llama.

    .venv/bin/python benchmarks/quant_speed.py                      # a quiet machine: ~10 min on 2 cores
    .venv/bin/python benchmarks/quant_speed.py --quick --no-write   # smoke test

Timing is only meaningful on an otherwise idle machine; the section "## Compression: decode speed" of
docs/benchmarks.md is rewritten with the table and the ratios int8/q8_0 and int4/q4_0 (aim: >= 1.0x).
Models, prompts and GGUF caching are the serving benchmark's (benchmarks/serve_bench.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # noqa: E402
from quant_quality import write_section  # noqa: E402

SECTION = "## Compression: decode speed"
PAIRS = (("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))


def llama_cpp_decode(m, qtype: str, prompt_ids, n: int, repeats: int, threads: int, repack: bool):
    """serve_bench's llama.cpp decode; `repack=False` loads without CPU weight repacking, which segfaults on
    quantized tensors with llama-cpp-python 0.3.36 on an AVX-512/AMX machine (it is llama.cpp's fastest path
    where it works, so a ratio measured without it flatters minicoder: the table says which was used)."""
    import llama_cpp

    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    if not repack:
        llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    try:
        return sb.decode_llama_cpp(m, qtype, prompt_ids, n, repeats, threads)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,200M")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    ap.add_argument("--new-tokens", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=sb.ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--llama-repack", action="store_true",
                    help="let llama.cpp repack quantized weights (its fastest CPU path; crashes on some CPUs)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    args.models = [s.strip() for s in args.models.split(",") if s.strip()]
    args.gguf_types = [g for _, g in PAIRS]
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    vers = sb.versions()
    lines = [SECTION, "", f"`benchmarks/quant_speed.py` on {started}, {sb.cpu_name()} ({vers['minicoder']}, torch {vers['torch']}, "
             f"llama-cpp-python {vers['llama-cpp-python']}); "
             f"{args.threads} threads each, greedy, batch 1, fixed output length, best of {args.repeats}; llama.cpp "
             f"q8_0/q4_0 {'with' if args.llama_repack else 'without'} weight repacking.", "",
             "| model | minicoder format | tok/s | weights read (MB) | llama.cpp type | tok/s | ratio |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for m in sb.prepare_models(args):
        prompt_ids = AutoTokenizer.from_pretrained(m.path)(sb.prompt_text(0))["input_ids"]
        for ours, theirs in PAIRS:
            mine = sb.decode_minicoder(m, prompt_ids, m.new_tokens, args.repeats, None if ours == "fp32" else ours)
            llama = llama_cpp_decode(m, theirs, prompt_ids, m.new_tokens, args.repeats, args.threads,
                                     args.llama_repack or theirs == "f32")
            lines.append(f"| {m.name} | {ours} | {mine.tok_s:.1f} | {mine.weight_bytes / 1e6:.1f} | {theirs} | "
                         f"{llama.tok_s:.1f} | **{mine.tok_s / llama.tok_s:.2f}x** |")
            print(lines[-1], flush=True)
    text = "\n".join(lines + [""])
    print(text)
    if not args.no_write:
        write_section(text, args.out, SECTION)


if __name__ == "__main__":
    main()
