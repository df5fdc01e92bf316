"""The `minicoder` command: one subcommand per stage.

  minicoder data corpus SOURCE... --out DIR          sources -> filtered, ordered, deduplicated documents
  minicoder tokenizer train --corpus DIR --out DIR   byte-level BPE in Hugging Face format
  minicoder data pack --corpus DIR --tokenizer DIR --out DIR    FIM + tokenize -> uint16 shards
  minicoder pretrain --config FILE --data DIR --out DIR          train (torchrun for several processes)
  minicoder generate [MODEL] --prompt TEXT [--suffix TEXT]       completion / fill-in-the-middle (default: the shipped model)
  minicoder agent MODEL|--endpoint URL "question" [--tools ...]   CodeAct agent, code runs in the sandbox
  minicoder quantize MODEL --method awq --bits 4 --out DIR       AWQ / RTN int4, int8 weights
  minicoder export ship RUN --out models/minicoder-small          a recipe run -> the default model

Errors the user can fix print as one `error:` line (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .errors import MinicoderError
from .engine.options import add_dtype_argument, add_engine_arguments
from .quant.options import add_compression_arguments
from .shipped import default_help
from .speculation_options import add_speculation_arguments


def cmd_corpus(args):
    from .data import corpus

    corpus.run(args)


def cmd_tokenizer_train(args):
    from .data.io import atomic_output_dir
    from .tokenizer import corpus_texts, save_tokenizer, train_tokenizer

    if args.vocab_size < 512 or args.vocab_size > 1 << 17:
        raise MinicoderError(f"--vocab-size must be between 512 and 131072, got {args.vocab_size}")
    start = time.time()
    with atomic_output_dir(args.out, force=args.force) as tmp:
        texts = corpus_texts(args.corpus, max_bytes=args.sample_bytes)
        tok = train_tokenizer(texts, vocab_size=args.vocab_size)
        save_tokenizer(tok, tmp, model_max_length=args.model_max_length)
        meta = {"corpus": str(Path(args.corpus).resolve()), "vocab_size": tok.get_vocab_size(),
                "sample_bytes": args.sample_bytes, "pre_tokenizer": "gpt-2 byte-level", "seconds": round(time.time() - start, 1)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"tokenizer: {meta['vocab_size']} tokens, trained on <= {args.sample_bytes / 1e6:.0f} MB in {meta['seconds']}s -> {args.out}")


def cmd_pack(args):
    from .data.fim import FimSettings
    from .data.pack import pack

    fim = FimSettings(rate=args.fim_rate, spm_rate=args.fim_spm_rate, line_rate=args.fim_line_rate)
    meta = pack(args.corpus, args.tokenizer, args.out, fim=fim, window=args.seq_len, chunk_tokens=args.fim_chunk_tokens,
                val_fraction=args.val_fraction, seed=args.seed, force=args.force)
    tr, va, f = meta["splits"]["train"], meta["splits"]["val"], meta["fim"]
    print(f"packed: train {tr['tokens']:,} tokens ({tr['documents']} documents, {tr['repositories']} repositories, "
          f"{f['placed']} FIM chunks inside {f['window']}-token windows, {f['demoted_to_plain']} left plain); "
          f"val {va['tokens']:,} tokens ({va['repositories']} repositories); {meta['seconds']}s -> {args.out}")


def cmd_sft_data(args):
    from .data.sft import build_sft_data

    meta = build_sft_data(args.out, args.corpus, args.messages or (), seed=args.seed, val_fraction=args.val_fraction,
                          max_pairs=args.max_pairs, decontaminate=not args.no_decontam, skip_bad=args.skip_bad,
                          exercises=args.exercises, force=args.force)
    counts = meta["counts"]
    print(f"SFT data: {meta['train']} train + {meta['val']} val conversations ({', '.join(f'{k} {v}' for k, v in meta['kinds'].items())}); "
          f"removed {counts.get('duplicates', 0)} duplicates, {counts.get('decontaminated', 0)} HumanEval-contaminated"
          + (f"; skipped {counts['user_skipped']} bad lines" if counts.get("user_skipped") else "") + f" -> {args.out}")


def cmd_tasks(args):
    from .data.tasks import build_task_corpus

    meta = build_task_corpus(args.out, args.corpus, exercises=args.exercises, replay=args.replay, seed=args.seed,
                             val_fraction=args.val_fraction, force=args.force)
    print(f"task data: {meta['exercises_kept']} verified exercises of {meta['exercises_requested']}; documents "
          + ", ".join(f"{k} {v}" for k, v in meta["documents"].items())
          + "; " + ", ".join(f"{k} {v}" for k, v in meta["kept"].items())
          + f"; dropped {', '.join(f'{k} {v}' for k, v in meta['dropped'].items()) or 'nothing'}"
          + f" -> {args.out}")


def cmd_train(args, overrides):
    """`pretrain` and `sft`: one loop; they differ in the data they feed it."""
    from .config import load_config
    from .train.loop import train

    model_cfg, train_cfg = load_config(args.config, overrides)
    if args.max_steps is not None:
        train_cfg.max_steps = args.max_steps
    if args.stop_after is not None and args.stop_after < 1:
        raise MinicoderError(f"--stop-after must be >= 1, got {args.stop_after}")
    data = args.data
    if args.command == "sft":
        from .train.sft import sft_datasets

        train_cfg.init = args.init
        data = sft_datasets(args.data, args.init, train_cfg.seq_len)
    summary = train(model_cfg, train_cfg, data, args.out, resume=args.resume, stop_after=args.stop_after,
                    progress=not args.quiet, run_info={"stage": args.command, "preset": Path(args.config).stem})
    if summary.get("end_step", 0) > summary.get("start_step", 0):
        line = f"trained steps {summary['start_step']}..{summary['end_step']}: {summary['tokens']:,} tokens in {summary['seconds']}s, loss {summary['loss']:.4f}"
        if summary.get("val_loss") is not None:
            line += f", val_loss {summary['val_loss']:.4f}"
        if summary.get("val_bpb") is not None:
            line += f", val_bpb {summary['val_bpb']:.4f}"
        print(line)
    if "final" in summary:
        print(f"final model: {summary['final']}")


def cmd_generate(args):
    from .engine.single_user import SingleUserEngine
    from .engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    try:
        params.validate()
    except ValueError as e:
        raise MinicoderError(str(e)) from None
    if args.chat and args.suffix is not None:
        raise MinicoderError("--chat and --suffix cannot be combined")
    from .engine.engine import EngineConfig
    from .engine.options import engine_options
    from .quant.options import compression_config

    from .shipped import resolve_model
    from .speculation_options import speculation_config

    model = resolve_model(args.model, "instruct" if args.chat else "base")
    gen = SingleUserEngine(model, EngineConfig(max_num_seqs=1, **compression_config(args), **engine_options(args),
                                               **speculation_config(args)))
    print(gen.engine.runtime_summary(), file=sys.stderr)
    try:
        if args.chat:
            text = gen.chat([{"role": "user", "content": args.prompt}], params)
        else:
            text = gen.complete(args.prompt, args.suffix, params)
    except ValueError as e:
        raise MinicoderError(str(e)) from None
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


def cmd_serve(args):
    from .server.cli import run_serve

    return run_serve(args)


def cmd_chat(args):
    from .chat import run

    return run(args)


def cmd_agent(args):
    from .agent.cli import run

    return run(args)


def cmd_eval(args):
    from .eval.report import describe_model, write_report
    from .engine.options import engine_options
    from .quant.options import compression_config

    out = Path(args.out)
    if not args.model and not getattr(args, "endpoint", None) and not getattr(args, "samples", None):
        from .shipped import default_model

        args.model = default_model("base")
    engine = {**compression_config(args), **engine_options(args)}  # EngineConfig keyword arguments
    model_info = describe_model(getattr(args, "model", None), getattr(args, "endpoint", None))
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in engine.items() if k != "compile" and v not in (None, "auto"))
    if flags and model_info["model"]:  # the results table says how the model was compressed
        model_info["model"] = f"{model_info['model']} {flags}"
    if args.eval_command == "humaneval":
        from .eval.completers import make_completer
        from .eval.humaneval import generate_samples, score_samples

        out.mkdir(parents=True, exist_ok=True)
        if args.protocol == "standard" and (args.samples or args.temperature is not None):
            raise MinicoderError("--protocol standard sets its own temperatures and generates its own samples: "
                                 "drop --temperature / --samples")
        if args.samples:
            samples = Path(args.samples)
            model_info["model"] = model_info["model"] or str(samples)
            scores = score_samples(samples, ks=(1, 10, 100))
        elif args.protocol == "standard":
            from .eval.protocol import run_settings, standard_settings

            completer = make_completer(args.model, args.endpoint, seed=args.seed, compression=engine)
            scores = run_settings(completer, out, standard_settings(args.n_samples or 20), args.limit)
        else:
            completer = make_completer(args.model, args.endpoint, seed=args.seed, compression=engine)
            samples = generate_samples(completer, out / "samples.jsonl", args.n_samples or 1, args.temperature or 0.0,
                                       args.limit)
            scores = score_samples(samples, ks=(1, 10, 100))
        if args.samples or args.protocol == "single":
            print(f"HumanEval: {scores['problems']} problems, {scores['samples']} samples: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("pass@"))
                  + f" -> {samples.with_name(samples.name + '_results.jsonl')}")
    elif args.eval_command == "infill":
        from .eval.completers import make_completer
        from .eval.humaneval import write_jsonl
        from .eval.infill import run_infill

        scores, rows = run_infill(make_completer(args.model, args.endpoint, compression=engine),
                                  limit=args.limit)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "infill_results.jsonl", rows)
        print(f"single-line infilling: {scores['tasks']} lines, exact match {scores['exact_match']:.4f}, pass@1 {scores['pass@1']:.4f}")
    else:
        from .eval.loss import heldout_loss

        scores = heldout_loss(args.model, args.data, seq_len=args.seq_len, max_windows=args.max_windows,
                              **engine)
        print(f"held-out loss {scores['loss']:.4f} nats/token, {scores['bits_per_byte']:.4f} bits/byte "
              f"({scores['windows']} windows of {scores['seq_len']} tokens)")
    command = "minicoder " + shlex.join(args.argv) if getattr(args, "argv", None) else None
    summary = write_report(args.eval_command, scores, model_info, out, args.results_md, command)
    print(f"summary: {out / (summary['task'] + '_summary.json')}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicoder", description="Build a code LLM from scratch and use it.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build corpora and packed training data").add_subparsers(dest="data_command", required=True)
    from .data import corpus

    c = data.add_parser("corpus", help="sources -> filtered, ordered, deduplicated repository documents")
    corpus.configure_parser(c)
    c.set_defaults(func=cmd_corpus)

    k = data.add_parser("pack", help="FIM-transform and tokenize a corpus into uint16 shards")
    k.add_argument("--corpus", required=True, help="a directory made by `minicoder data corpus`")
    k.add_argument("--tokenizer", required=True, help="a directory made by `minicoder tokenizer train`")
    k.add_argument("--out", required=True)
    k.add_argument("--seq-len", type=int, default=512, help="the training sequence length: every FIM chunk is placed "
                   "inside one window of this many tokens (default 512)")
    k.add_argument("--fim-rate", type=float, default=0.5, help="fraction of training chunks FIM-transformed (default 0.5)")
    k.add_argument("--fim-spm-rate", type=float, default=0.5, help="fraction of FIM chunks in SPM order, the rest PSM (default 0.5)")
    k.add_argument("--fim-line-rate", type=float, default=0.5,
                   help="fraction of FIM chunks whose middle is whole line(s), the rest a random span (default 0.5)")
    k.add_argument("--fim-chunk-tokens", type=int, help="longest chunk a file is cut into (default 3/4 of --seq-len)")
    k.add_argument("--val-fraction", type=float, default=0.05, help="fraction of repositories held out (default 0.05)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--force", action="store_true", help="replace an existing output directory")
    k.set_defaults(func=cmd_pack)

    d = data.add_parser("sft", help="instruction data mined from a corpus and/or your own chat JSONL")
    d.add_argument("--corpus", help="a directory made by `minicoder data corpus` to mine documented functions from")
    d.add_argument("--messages", action="append", help="a JSONL file of {\"messages\": [...]} rows (repeatable)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--val-fraction", type=float, default=0.05)
    d.add_argument("--max-pairs", type=int, help="keep at most this many conversations (a seeded sample)")
    d.add_argument("--skip-bad", action="store_true", help="skip malformed --messages lines (and count them) instead of failing")
    d.add_argument("--exercises", type=int, default=0, help="add N generated exercises (solutions verified in the sandbox)")
    d.add_argument("--no-decontam", action="store_true")
    d.add_argument("--force", action="store_true")
    d.set_defaults(func=cmd_sft_data)

    ta = data.add_parser("tasks", help="task-shaped data for annealing: verified exercises, mined documented functions, replay")
    ta.add_argument("--corpus", help="a directory made by `minicoder data corpus` to mine functions from and replay")
    ta.add_argument("--out", required=True)
    ta.add_argument("--exercises", type=int, default=20000, help="exercises to generate (each verified in the sandbox)")
    ta.add_argument("--replay", type=float, default=0.25, help="share of the corpus documents mixed back in (default 0.25)")
    ta.add_argument("--val-fraction", type=float, default=0.05, help="as given to `data pack`: its held-out "
                    "repositories are never mined or replayed")
    ta.add_argument("--seed", type=int, default=0, help="as given to `data pack`; also seeds the exercises")
    ta.add_argument("--force", action="store_true")
    ta.set_defaults(func=cmd_tasks)

    t = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="tok_command", required=True)
    tt = t.add_parser("train", help="train byte-level BPE on a bounded sample of a corpus")
    tt.add_argument("--corpus", required=True)
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--sample-bytes", type=int, default=50_000_000, help="bytes of corpus text to train on (bounds memory)")
    tt.add_argument("--model-max-length", type=int, default=4096)
    tt.add_argument("--force", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)

    for name in ("pretrain", "sft"):
        r = sub.add_parser(name, help=("pretrain a model on packed data" if name == "pretrain" else
                                       "instruction-tune a checkpoint on chat data") + " (any other --name VALUE overrides the config)")
        r.add_argument("--config", required=True, help="a preset such as configs/nano.toml" if name == "pretrain" else "such as configs/nano_sft.toml")
        if name == "sft":
            r.add_argument("--init", required=True, help="the pretrained model directory to start from")
        r.add_argument("--data", required=True, help="a directory made by `minicoder data pack`" if name == "pretrain" else
                       "a directory made by `minicoder data sft`")
        r.add_argument("--out", required=True)
        r.add_argument("--max-steps", type=int, help="the run's length (sets the learning-rate schedule)")
        r.add_argument("--stop-after", type=int, help="halt at this step with a resumable checkpoint")
        r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        r.add_argument("--quiet", action="store_true", help="no progress bar")
        r.set_defaults(func=cmd_train, takes_overrides=True)

    g = sub.add_parser("generate", help="complete a prompt, or fill in the middle with --suffix")
    g.add_argument("model", nargs="?", help="a checkpoint or final/; " + default_help("base") +
                   "; with --chat the instruct model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--suffix", help="text after the hole: turns on fill-in-the-middle")
    g.add_argument("--chat", action="store_true", help="treat --prompt as a user message, laid out with the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    add_compression_arguments(g)
    add_speculation_arguments(g)
    add_engine_arguments(g, compile_default="off")  # one request does not repay the compile
    g.set_defaults(func=cmd_generate)
    ex = sub.add_parser("export", help="export a model to other formats").add_subparsers(dest="export_command", required=True)
    from .export import gguf

    xg = ex.add_parser("gguf", help="GGUF for llama.cpp / Ollama: weights, tokenizer (with FIM tokens), chat template")
    gguf.configure_parser(xg)
    xg.set_defaults(func=gguf.run)
    from .export import ship

    xs = ex.add_parser("ship", help="a finished recipe run -> bf16 base + instruct models and the model card (the default model)")
    ship.configure_parser(xs)
    xs.set_defaults(func=ship.run)

    from .quant import cli as quant_cli

    qz = sub.add_parser("quantize", help="AWQ / round-to-nearest int4 or int8 weights -> a quantized model directory")
    quant_cli.configure_parser(qz)
    qz.set_defaults(func=quant_cli.run)

    from .chat import configure_parser as configure_chat
    from .server.cli import configure_serve_parser

    sv = sub.add_parser("serve", help="HTTP server: OpenAI, Ollama, llama.cpp /infill, Tabby APIs, web UI, prompt + history chat (POST /)")
    configure_serve_parser(sv)
    sv.set_defaults(func=cmd_serve)
    from .server.ui_proxy import configure_ui_parser, run_ui

    ui = sub.add_parser("ui", help="the web UI for a running minicoder (or OpenAI-compatible) server")
    configure_ui_parser(ui)
    ui.set_defaults(func=run_ui)
    ch = sub.add_parser("chat", help="terminal chat with a pretrained (raw) or SFT (chat template) model")
    configure_chat(ch)
    ch.set_defaults(func=cmd_chat)

    from .agent.cli import configure_parser as configure_agent

    ag = sub.add_parser("agent", help="CodeAct agent: the model answers with Python that runs in the sandbox")
    configure_agent(ag)
    ag.set_defaults(func=cmd_agent)

    ev = sub.add_parser("eval", help="HumanEval pass@k, single-line infilling, held-out loss").add_subparsers(
        dest="eval_command", required=True)
    for name, help_text in (("humaneval", "HumanEval pass@k with executed tests (in the sandbox)"),
                            ("infill", "HumanEval single-line infilling: exact match and pass@1"),
                            ("loss", "held-out loss and bits per byte on packed validation data")):
        e = ev.add_parser(name, help=help_text)
        e.add_argument("model", nargs="?", help=default_help("base"))
        if name != "loss":
            e.add_argument("--endpoint", help="an OpenAI-compatible base URL instead of MODEL, e.g. http://127.0.0.1:8000/v1")
            e.add_argument("--limit", type=int, help="only the first K problems")
        else:
            e.add_argument("--data", required=True, help="a directory made by `minicoder data pack`")
            e.add_argument("--seq-len", type=int)
            e.add_argument("--max-windows", type=int)
        if name == "humaneval":
            e.add_argument("--protocol", choices=["single", "standard"], default="single",
                           help="single: one run at --temperature (default); standard: pass@1 greedy, pass@1 at T=0.2 "
                                "and pass@10 at T=0.8 (n=20 each unless --n-samples), as papers report them")
            e.add_argument("--n-samples", type=int, help="samples per problem (default 1; 20 with --protocol standard)")
            e.add_argument("--temperature", type=float, help="with --protocol single (default 0 = greedy)")
            e.add_argument("--samples", help="score this existing samples JSONL instead of generating")
            e.add_argument("--seed", type=int, default=0)
        e.add_argument("--out", default="runs/eval", help="where samples, results and the summary go")
        e.add_argument("--results-md", help="also append a row to this Markdown results table (e.g. docs/results.md)")
        add_compression_arguments(e)
        (add_dtype_argument if name == "loss" else add_engine_arguments)(e)
        e.set_defaults(func=cmd_eval)

    from . import recipe

    rc = sub.add_parser("recipe", help="the whole model in one resumable command: corpus -> ... -> SFT -> eval -> model card")
    recipe.configure_parser(rc)
    rc.set_defaults(func=recipe.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # quoted in reports (the eval summary's command)
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        else:
            return args.func(args) or 0
    except MinicoderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
