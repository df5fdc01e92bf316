"""`minicoder recipe NAME --out DIR`: the whole model, corpus to model card, as one resumable command.

Stages, in order, each an ordinary `minicoder` command run in this process with its output under DIR:
  packages   pinned permissively licensed pure-Python packages pip-installed into DIR/corpus_venv (licences
             read from their metadata), when the recipe lists any
  corpus     the recipe's sources (+ the corpus venv's site-packages) -> DIR/corpus; licences added to meta.json
  tokenizer  byte-level BPE -> DIR/tokenizer
  pack       per-chunk FIM, windows of the pretraining seq_len -> DIR/data
  pretrain   the recipe's preset, warmup-stable (no decay: annealing is the decay) -> DIR/pretrain
  tasks      verified exercises + mined functions + replay -> DIR/tasks, packed -> DIR/tasks_data
  anneal     the learning-rate decay on the task data, from the pretrained model -> DIR/anneal (the base model)
  sft_data   chat pairs mined from the corpus + exercises -> DIR/sft_data
  sft        instruction tuning of the annealed model -> DIR/sft (the instruct model)
  eval       held-out bits per byte, single-line infilling, HumanEval -> DIR/eval, DIR/results.md
  card       DIR/MODEL_CARD.md from everything above
DIR/recipe.json records each finished stage and its wall time. `--stop-after STAGE` ends after that stage;
`--resume` skips finished stages and continues a training stage from its newest checkpoint, so the recipe
can run in sittings (Ctrl-C loses at most one save interval). Recipes are TOML files: configs/recipe_NAME.toml.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from pathlib import Path

from .errors import MinicoderError

STAGES = ("packages", "corpus", "tokenizer", "pack", "pretrain", "tasks", "anneal", "sft_data", "sft", "eval", "card")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the source checkout's presets


def find_recipe(name: str) -> Path:
    for path in (Path(name), CONFIGS / f"recipe_{name}.toml"):
        if path.is_file():
            return path
    known = sorted(p.stem.removeprefix("recipe_") for p in CONFIGS.glob("recipe_*.toml"))
    raise MinicoderError(f"unknown recipe {name!r}: not a file, and not one of {', '.join(known) or 'none'}")


def load_recipe(path: Path) -> dict:
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MinicoderError(f"{path}: invalid TOML ({e})") from None
    unknown = set(recipe) - set(STAGES) - {"recipe"}
    if unknown:
        raise MinicoderError(f"{path}: unknown table(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    return recipe


def preset(recipe_file: Path, value: str) -> str:
    """A preset path in a recipe, relative to the recipe's folder."""
    path = (recipe_file.parent / value).resolve()
    if not path.is_file():
        raise MinicoderError(f"{recipe_file}: preset {value} does not exist")
    return str(path)


def overrides(table: dict) -> list[str]:
    return [arg for key, value in table.get("overrides", {}).items() for arg in (f"--{key.replace('_', '-')}", str(value))]


class Recipe:
    def __init__(self, name: str, out: str | Path, resume: bool):
        self.file = find_recipe(name)
        self.cfg = load_recipe(self.file)
        self.out = Path(out)
        self.state_file = self.out / "recipe.json"
        if self.state_file.exists() and not resume:
            raise MinicoderError(f"{self.out}: already holds a recipe run; pass --resume to continue it or choose another --out")
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {
            "recipe": str(self.file), "stages": {}}
        self.out.mkdir(parents=True, exist_ok=True)

    def save(self):
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def minicoder(self, *argv: str):
        from .cli import main

        print(f"$ minicoder {' '.join(argv)}", flush=True)
        rc = main(list(argv))
        if rc:
            raise MinicoderError(f"recipe stage failed: `minicoder {' '.join(argv)}` exited {rc}; fix it and rerun with --resume")

    def path(self, name: str) -> str:
        return str(self.out / name)

    def train_args(self, out: str) -> list[str]:
        """--resume when an interrupted training stage left checkpoints."""
        from .train.checkpoint import list_checkpoints

        return ["--resume"] if list_checkpoints(Path(out)) else []

    def fresh(self, name: str) -> list[str]:
        """--force for a data stage whose output exists but was not recorded as finished."""
        return ["--force"] if (self.out / name).exists() else []

    # ---- stages -------------------------------------------------------------------------------------

    def stage_packages(self):
        from .recipe_packages import install_packages

        packages = self.cfg.get("packages", {}).get("install", [])
        self.state["packages"] = install_packages(packages, self.out / "corpus_venv") if packages else {}

    def stage_corpus(self):
        c = self.cfg.get("corpus", {})
        sources = list(c.get("sources", ["stdlib"]))
        if self.state.get("packages"):
            sources.append(self.state["packages"]["site_packages"])
        extra = [a for k, v in c.items() if k != "sources" for a in (f"--{k.replace('_', '-')}", str(v))]
        self.minicoder("data", "corpus", *sources, "--out", self.path("corpus"), *extra, *self.fresh("corpus"))
        if self.state.get("packages"):
            meta_file = self.out / "corpus" / "meta.json"
            meta = json.loads(meta_file.read_text())
            meta["package_licences"] = self.state["packages"]["licences"]
            meta_file.write_text(json.dumps(meta, indent=2) + "\n")

    def stage_tokenizer(self):
        t = self.cfg.get("tokenizer", {})
        self.minicoder("tokenizer", "train", "--corpus", self.path("corpus"), "--out", self.path("tokenizer"),
                       "--vocab-size", str(t.get("vocab_size", 8192)), *self.fresh("tokenizer"))

    def seq_len(self) -> int:
        from .config import load_config

        p = self.cfg["pretrain"]
        return load_config(preset(self.file, p["config"]), overrides(p))[1].seq_len

    def stage_pack(self):
        self.minicoder("data", "pack", "--corpus", self.path("corpus"), "--tokenizer", self.path("tokenizer"),
                       "--out", self.path("data"), "--seq-len", str(self.seq_len()), *self.fresh("data"))

    def stage_pretrain(self):
        p = self.cfg["pretrain"]
        out = self.path("pretrain")
        self.minicoder("pretrain", "--config", preset(self.file, p["config"]), "--data", self.path("data"), "--out", out,
                       "--schedule", "wsd", "--decay-fraction", str(p.get("decay_fraction", 0.0)), *overrides(p),
                       *self.train_args(out), "--quiet")

    def stage_tasks(self):
        t = self.cfg.get("tasks", {})
        if not (self.out / "tasks" / "meta.json").exists():
            self.minicoder("data", "tasks", "--corpus", self.path("corpus"), "--out", self.path("tasks"),
                           "--exercises", str(t.get("exercises", 20000)), "--replay", str(t.get("replay", 0.25)),
                           *self.fresh("tasks"))
        self.minicoder("data", "pack", "--corpus", self.path("tasks"), "--tokenizer", self.path("tokenizer"),
                       "--out", self.path("tasks_data"), "--seq-len", str(self.seq_len()), *self.fresh("tasks_data"))

    def stage_anneal(self):
        p, a = self.cfg["pretrain"], self.cfg.get("anneal", {})
        out = self.path("anneal")
        self.minicoder("pretrain", "--config", preset(self.file, p["config"]), "--data", self.path("tasks_data"),
                       "--out", out, "--init", self.path("pretrain/final"), *overrides(p),
                       # after the pretraining overrides, which would otherwise warm the rate up again from 0
                       "--schedule", "wsd", "--decay-fraction", "1", "--warmup-steps", "0",
                       "--min-lr-ratio", str(a.get("min_lr_ratio", 0.02)), *overrides(a), *self.train_args(out), "--quiet")

    def stage_sft_data(self):
        s = self.cfg.get("sft", {})
        self.minicoder("data", "sft", "--corpus", self.path("corpus"), "--out", self.path("sft_data"),
                       "--exercises", str(s.get("exercises", 4000)), "--max-pairs", str(s.get("max_pairs", 20000)),
                       *self.fresh("sft_data"))

    def stage_sft(self):
        s = self.cfg.get("sft", {})
        out = self.path("sft")
        self.minicoder("sft", "--config", preset(self.file, s.get("config", "nano_sft.toml")), "--init",
                       self.path("anneal/final"), "--data", self.path("sft_data"), "--out", out, *overrides(s),
                       *self.train_args(out), "--quiet")

    def stage_eval(self):
        e = self.cfg.get("eval", {})
        results = self.path("results.md")
        models = {"pretrain": "pretrain/final", "base": "anneal/final", "instruct": "sft/final"}
        for label, model in models.items():
            self.minicoder("eval", "loss", self.path(model), "--data", self.path("data"),
                           "--out", self.path(f"eval/{label}/loss"), "--results-md", results)
        limit = ["--limit", str(e["limit"])] if e.get("limit") else []
        for label in ("base", "instruct"):
            self.minicoder("eval", "infill", self.path(models[label]), *limit, "--out", self.path(f"eval/{label}/infill"),
                           "--results-md", results)
            self.minicoder("eval", "humaneval", self.path(models[label]), "--protocol", e.get("protocol", "standard"),
                           "--n-samples", str(e.get("n_samples", 20)), *limit, "--out", self.path(f"eval/{label}/humaneval"),
                           "--results-md", results)

    def stage_card(self):
        from .model_card import write_model_card

        write_model_card(self.out, self.state)

    def run(self, stop_after: str | None):
        for name in STAGES:
            record = self.state["stages"].get(name)
            if record and record.get("done"):
                print(f"== {name}: done earlier ({record['seconds']}s)")
            else:
                print(f"== {name}", flush=True)
                start = time.time()
                previous = (record or {}).get("seconds", 0)  # earlier sittings of an interrupted stage
                try:
                    getattr(self, f"stage_{name}")()
                except BaseException:
                    self.state["stages"][name] = {"done": False, "seconds": round(previous + time.time() - start, 1)}
                    self.save()
                    raise
                self.state["stages"][name] = {"done": True, "seconds": round(previous + time.time() - start, 1),
                                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                self.save()
            if name == stop_after:
                print(f"stopped after {name}; continue with: minicoder recipe {self.file} --out {self.out} --resume")
                return
        total = sum(s["seconds"] for s in self.state["stages"].values())
        print(f"recipe done in {total:.0f}s of stage time: base model {self.out / 'anneal/final'}, instruct model "
              f"{self.out / 'sft/final'}, model card {self.out / 'MODEL_CARD.md'}")


def configure_parser(p):
    p.add_argument("name", help="a recipe: tiny, small, or a path to a recipe TOML file")
    p.add_argument("--out", required=True, help="where every stage's output goes")
    p.add_argument("--stop-after", choices=STAGES, help="end after this stage (continue later with --resume)")
    p.add_argument("--resume", action="store_true", help="continue a recipe run in --out")


def run(args):
    sys.stdout.reconfigure(line_buffering=True)  # a recipe log shows each stage as it happens
    recipe = Recipe(args.name, args.out, args.resume)
    try:
        recipe.run(args.stop_after)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: minicoder recipe {args.name} --out {args.out} --resume", file=sys.stderr)
        raise
