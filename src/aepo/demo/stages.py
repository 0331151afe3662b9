"""`aepo demo`: a small agent learns to use tools with AEPO on a CPU, from nothing.

    world -> tokenizer + tiny Qwen3 -> SFT on noisy expert demonstrations -> eval
          -> RL (AEPO by default) -> eval -> report (summary.md, summary.json, PNG plots)

Every stage's output is cached in the run directory, so a re-run (or a run after a kill)
continues where it stopped; RL resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from aepo.config import QUICK_DEMO, Config, DemoConfig, load_config
from aepo.console import console
from aepo.eval.plots import plot_bars, plot_curves
from aepo.eval.report import training_table
from aepo.eval.runner import evaluate_tasks, summarize
from aepo.io import atomic_dir, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from aepo.train.threads import set_threads

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"

# The file whose presence marks a stage done in a run directory: the stage is then skipped
# (and reported as cached).
WORLD_DONE = Path("world/world.json")
MODEL_DONE = Path("model_init/config.json")
SFT_DONE = Path("sft/config.json")
RL_DONE = Path("rl/final/config.json")


def eval_done(name: str) -> Path:
    """The summary file of evaluation `name` ("sft", "rl", ...), which marks it done."""
    return Path(f"eval_{name}.json")


STAGES: dict[str, tuple[Path, tuple[str, ...]]] = {
    "world": (WORLD_DONE, ("world",)),
    "demonstrations": (MODEL_DONE, ("sft_data.jsonl", "model_init")),
    "SFT": (SFT_DONE, ("sft", "sft_examples.jsonl")),
    "SFT eval": (eval_done("sft"), ("eval_sft.json", "eval_sft_samples.jsonl")),
    "RL": (RL_DONE, ("rl",)),
    "RL eval": (eval_done("rl"), ("eval_rl.json", "eval_rl_samples.jsonl")),
}
"""Each stage: the file that marks it done, and every output it owns (removed when it is redone)."""
STAGES_FILE = "stages.json"
"""{stage: {"key": what made it, "seconds": how long it took}}: a finished stage is reused only
under the same key, and the report shows every stage's time, cached ones included."""


DemoPlan = DemoConfig
"""The demo's sizes: the `demo` section of the run config (`aepo.config.DemoConfig`)."""


def build_tools(world: Any, tools: Any = None) -> Any:
    """The demo's tool runner: search is BM25 over the world's corpus; the rest (enabled tools,
    limits, the sandbox's isolation) is `tools`, a run's `tools.*` (default: search, calc and
    python with a 5 s program limit)."""
    import dataclasses

    from aepo.config import ToolsConfig
    from aepo.tools import build_tool_runner

    cfg = ToolsConfig(python_timeout=5.0) if tools is None else dataclasses.replace(
        tools, search_cache="", search_corpus="", search_url="")
    return build_tool_runner(cfg, corpus_docs=world.corpus)


def world_tasks(rows: list[dict]) -> list[Any]:
    from aepo.data.datasets import TaskRow

    return [TaskRow(id=str(r["id"]), question=r["question"], answers=list(r["answer"]),
                    data_source=r.get("data_source", "demo_world"), extra={"kind": r.get("kind")})
            for r in rows]


def stage_world(out: Path, plan: DemoPlan, seed: int) -> Any:
    from aepo.demo.world import World, demo_world

    wdir = (out / WORLD_DONE).parent
    if not (out / WORLD_DONE).exists():
        demo_world(seed, size=plan.world_size, level=plan.world_level, kinds=plan.world_kinds).save(wdir)
    return World.load(wdir)


def sample_world(plan: DemoPlan, seed: int, base: int, index: int) -> Any:
    """Sample world `index` of series `base` for demo seed `seed`: it shares the demo world's
    name pool (`name_seed`) but none of its entities or facts."""
    from aepo.demo.world import build_world, kinds_spec, world_spec

    spec = kinds_spec(world_spec(plan.world_size, plan.world_level), plan.world_kinds) if plan.world_kinds else None
    return build_world(seed=base + 97 * seed + index, size=plan.world_size, level=plan.world_level, spec=spec,
                       name_seed=seed)


def tokenizer_texts(seed: int, plan: DemoPlan) -> list[str]:
    """Text of sample worlds that share this world's name pool (`name_seed`): every name word
    is one token, and each also names someone in the training data of some world, so the
    model learns to write it. (With per-world names, a held-out person's name would be a token
    that is never a training target, and the model could never write it.)"""
    from aepo.demo.world import number_words

    texts: list[str] = []
    for s in range(plan.tokenizer_worlds):
        texts += sample_world(plan, seed, 10_000, s).vocabulary_texts()
    # Every number the world can ask for or compute is one token: the tokenizer keeps digit
    # runs whole (`split_digits=False`) and listing each number twice makes it a merge (BPE
    # merges pairs seen at least twice); listed as in sentences and as on a result line.
    numbers = number_words()
    return texts + [" ".join(numbers), "\n".join(numbers)] * 2


def expert_demonstrations(plan: DemoPlan, seed: int, tools: Any = None) -> list[dict]:
    """Noisy expert demonstrations from `plan.demo_worlds` sample worlds other than the demo
    world, searched with the run's `tools` settings (`build_tools`), so that SFT sees search
    results as RL and evaluation render them (`tools.search_topk` pages). Their entities and
    facts differ from the demo world's (only the name pool is shared), so the model cannot
    memorise answers: it has to copy names and facts out of the question and the search
    results. The demo world itself is new to the SFT model, on its train split (where RL
    trains) as on its test split (where both are evaluated)."""
    from aepo.demo.expert import ExpertNoise, demonstrations
    from aepo.demo.world import has_forks

    per = max(1, plan.n_demos // plan.demo_worlds)
    demos: list[dict] = []
    for i in range(1, plan.demo_worlds + 1):
        w = sample_world(plan, seed, 20_000, i)
        r = build_tools(w, tools)
        try:
            # The expert calls the built-in search and calc with well-formed arguments, so it calls
            # them in this thread: the runner's worker thread per call (for its timeout) was half
            # of this stage's time.
            def tool_fn(name: str, arg: str, tools: Any = r.tools) -> str:
                return tools[name](arg)

            # a fork world's expert errs only by skipping verification at forks (ExpertNoise.quiet)
            noise = ExpertNoise.quiet() if has_forks(w.spec) else None
            demos += demonstrations(w, "train", tool_fn, n=per, seed=seed + i, noise=noise)
        finally:
            r.close()
    random.Random(seed).shuffle(demos)
    return demos


def stage_model(out: Path, plan: DemoPlan, seed: int, tools: Any = None) -> tuple[Path, list[dict]]:
    """Demonstrations (searched with `tools`, see `expert_demonstrations`), tokenizer and the
    randomly initialised model (cached)."""
    from aepo.models.factory import init_model
    from aepo.models.tokenizer import build_tokenizer

    demo_file = out / "sft_data.jsonl"
    if not demo_file.exists():
        write_jsonl(demo_file, expert_demonstrations(plan, seed, tools))
    demos = read_jsonl(demo_file)
    mdir = (out / MODEL_DONE).parent
    if not (out / MODEL_DONE).exists():
        with atomic_dir(mdir) as tmp:
            tok = build_tokenizer(tokenizer_texts(seed, plan), tmp, max_vocab=plan.vocab_size,
                                  split_digits=False)
            init_model(tmp, tok, preset=plan.model_preset, seed=seed)
    return mdir, demos


def sft_examples(demos: list[dict], tokenizer: Any, plan: DemoPlan, seed: int) -> list[Any]:
    """The SFT stage's examples: the demonstrations, then `plan.recall_drills` recall drills."""
    from aepo.demo.world import number_words
    from aepo.train.sft import encode_demonstration, recall_drills

    examples = [encode_demonstration(d["prompt"], [tuple(s) for s in d["segments"]], tokenizer) for d in demos]
    # Years and other numbers are rare tokens that the tiny model would otherwise not learn to
    # copy out of a search result within the budget: drill "name -> number" recall alongside.
    names = {w for p in sample_world(plan, seed, 10_000, 0).people for w in p.name.split()}
    return examples + recall_drills(tokenizer, sorted(names), number_words(), plan.recall_drills, seed=seed)


def stage_sft(out: Path, init_dir: Path, demos: list[dict], cfg: Config, seed: int, progress: bool) -> Path:
    """SFT of the initial model on the demonstrations and recall drills (`cfg.sft`); the whole
    set is also written as token rows, `sft_examples.jsonl`, so `aepo sft` can train the same model."""
    from aepo.config import run_config_files
    from aepo.models.loading import load_model, save_model_dir
    from aepo.train.sft import sft_train

    sdir = (out / SFT_DONE).parent
    if (out / SFT_DONE).exists():
        return sdir
    model, tok = load_model(init_dir, device=cfg.model.device, dtype=cfg.model.dtype)
    examples = sft_examples(demos, tok, cfg.demo, seed)
    # the whole SFT set as token rows: `aepo sft --data sft_examples.jsonl` trains the same model
    write_jsonl(out / "sft_examples.jsonl", [{"input_ids": e.input_ids, "loss_mask": e.loss_mask} for e in examples])
    history = sft_train(model, tok, examples, cfg.sft, progress=progress)
    return save_model_dir(sdir, model, tok, jsonl_files={"sft_history.jsonl": history},
                          text_files=run_config_files(cfg))


def stage_eval(out: Path, name: str, model_dir: Path, tasks: list[Any], runner: Any, cfg: Config,
               progress: bool) -> dict[str, Any]:
    """Evaluate `model_dir` on `tasks` with `cfg.eval` (n samples, seed); cached in eval_{name}.json."""
    from aepo.models.loading import load_model

    path = out / eval_done(name)
    if path.exists():
        return json.loads(path.read_text())
    model, tok = load_model(model_dir, device=cfg.model.device, dtype=cfg.model.dtype)
    samples = out / f"eval_{name}_samples.jsonl"  # a killed eval resumes (its stage key was checked)
    recs = evaluate_tasks(model, tok, tasks, runner.run, n=cfg.eval.n, rollout_cfg=cfg.rollout, seed=cfg.eval.seed,
                          batch_prompts=cfg.eval.batch_prompts, samples_path=samples, progress=progress,
                          title=f"eval {name}", reward_cfg=cfg.reward, chat_template=cfg.model.chat_template,
                          tools=cfg.tools.enabled)
    summary = summarize(recs)
    atomic_write_json(path, summary)
    return summary


def stage_rl(out: Path, sft_dir: Path, tasks: list[Any], runner: Any, cfg: Config, progress: bool) -> Path:
    from aepo.models.loading import load_model, save_model_dir
    from aepo.train.rl import RLTrainer

    final = (out / RL_DONE).parent
    rdir = final.parent
    if (out / RL_DONE).exists():
        return final
    from aepo.rollout.sampler import build_backend

    model, tok = load_model(sft_dir, device=cfg.model.device, dtype=cfg.model.dtype)
    if cfg.actor.lora.rank > 0:  # LoRA on the SFT model: final/ is then an adapter directory
        from aepo.models.lora import apply_lora

        model = apply_lora(model, cfg.actor.lora, sft_dir)
    # the sampler engine is built from the SFT directory (a vLLM engine needs one)
    backend = build_backend(cfg.rollout, model, tok, sft_dir)
    try:
        trainer = RLTrainer(cfg, model, tok, tasks, runner.run, rdir, backend=backend)
        trainer.fit(resume=True, progress=progress)
    finally:
        backend.close()
    from aepo.config import run_config_files

    return save_model_dir(final, trainer.model, tok, text_files=run_config_files(cfg))


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: Config, seed: int) -> dict[str, dict[str, Any]]:
    """What each stage's output depends on (`cfg.demo`, `cfg.sft`, the RL config, `cfg.eval`
    and the evaluation settings). A stage's key holds the digest of the stage it starts from,
    so a change upstream makes every stage after it stale too."""
    from aepo.config import EVAL_KEYS, config_value, to_dict

    p = to_dict(cfg.demo)
    tools = {k: v for k, v in to_dict(cfg.tools).items() if k not in ("search_cache", "search_corpus", "search_url")}
    run = to_dict(cfg)
    run["tools"] = tools
    run["trainer"] = {k: v for k, v in run["trainer"].items() if k not in ("threads", "logger")}
    run["model"] = {k: v for k, v in run["model"].items() if k != "path"}
    for section in ("out_dir", "demo", "sft", "eval"):  # keyed by the stages they belong to
        run.pop(section, None)
    evals = {k: config_value(cfg, k) for k in EVAL_KEYS if not k.startswith("tools.search_")
             or k in ("tools.search_topk", "tools.search_max_chars")}
    keys: dict[str, dict[str, Any]] = {}
    keys["world"] = {"seed": seed, "world_size": p["world_size"], "world_level": p["world_level"]}
    if p["world_kinds"]:  # only when set, so that default runs keep their stage keys
        keys["world"]["world_kinds"] = p["world_kinds"]
    keys["demonstrations"] = {"world": _digest(keys["world"]), "tools": tools, **{
        k: p[k] for k in ("n_demos", "demo_worlds", "tokenizer_worlds", "vocab_size", "model_preset")}}
    keys["SFT"] = {"start": _digest(keys["demonstrations"]), "device": cfg.model.device, "dtype": cfg.model.dtype,
                   "recall_drills": p["recall_drills"], "sft": to_dict(cfg.sft)}
    eval_plan = {"settings": evals}  # eval.* among them
    keys["SFT eval"] = {"model": _digest(keys["SFT"]), **eval_plan}
    keys["RL"] = {"start": _digest(keys["SFT"]), "config": run}
    keys["RL eval"] = {"model": _digest(keys["RL"]), **eval_plan}
    return json.loads(json.dumps(keys, default=str))  # as they read back from STAGES_FILE


def _stale_stages(out: Path, keys: dict[str, dict[str, Any]], record: dict[str, Any]) -> dict[str, list[str]]:
    """{stage: differences} for stages with outputs in `out` made under another key."""
    from aepo.io import key_differences

    stale = {}
    for name in keys:
        if any((out / o).exists() for o in STAGES[name][1]):
            stored = record.get(name, {}).get("key")
            if stored != keys[name]:
                stale[name] = key_differences(stored, keys[name])
    return stale


class StageRunner:
    """Runs the stages of a run directory, each reused only under the key that made it.

    On creation every stage of `keys` whose outputs exist under another key is found: without
    `force` that raises StaleOutputError (naming the stages and the first one's differences),
    with `force` their outputs are removed so they run again. `run` times a stage that is not
    done and records its key and seconds in STAGES_FILE."""

    def __init__(self, out: Path, keys: dict[str, dict[str, Any]], *, force: bool = False,
                 what: str = "--out", hint: str = "choose another --out, or pass --force to redo them") -> None:
        from aepo.io import StaleOutputError, remove_output, shown_differences

        self.out, self.keys, self.cached = out, keys, set()
        self.path = out / STAGES_FILE
        try:
            self.record = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError:
            self.record = {}
        stale = _stale_stages(out, keys, self.record)
        if stale and not force:
            first = next(iter(stale))
            diffs = stale[first]
            raise StaleOutputError(f"{what} {out} holds stages made with other settings ({', '.join(stale)}; "
                                   f"{first}: {shown_differences(diffs, 4)}); {hint}", diffs)
        for name in stale:
            for o in STAGES[name][1]:
                remove_output(out / o)
            self.record.pop(name, None)

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        if (self.out / STAGES[name][0]).exists():
            self.cached.add(name)
            return fn(*args)
        t = time.time()
        result = fn(*args)
        self.record[name] = {"key": self.keys[name], "seconds": round(time.time() - t, 1)}
        atomic_write_json(self.path, self.record)
        return result

    def seconds(self) -> dict[str, float | None]:
        return {name: self.record.get(name, {}).get("seconds") for name in self.keys}


def demo_config(algo: str = "aepo", seed: int = 0, overrides: list[str] | None = None, *,
                quick: bool = False) -> Config:
    """The demo's run config: demo.yaml, the algorithm preset, the seed (of the world, SFT, RL
    and evaluation), QUICK_DEMO with `quick`, then `overrides` (any key, `demo.*` included)."""
    ov = [f"algo={algo}", f"trainer.seed={seed}", f"sft.seed={seed}", f"eval.seed={seed}",
          *(QUICK_DEMO if quick else []), *(overrides or [])]
    cfg = load_config(DEMO_CONFIG, ov)
    if cfg.demo.world_kinds:  # checked here: aepo.config sits below the demo package
        from aepo.config import ConfigError
        from aepo.demo.world import parse_kinds

        try:
            parse_kinds(cfg.demo.world_kinds)
        except ValueError as e:
            raise ConfigError(f"demo.world_kinds: {e}") from None
    return cfg


def write_report(out: Path, cfg: Config, sft: dict, rl: dict, wall: float,
                 stage_seconds: dict[str, float | None] | None = None, cached: set[str] | None = None) -> Path:
    from aepo.train.records import read_metrics

    metrics = read_metrics(out / "rl" / "metrics.jsonl")
    plots = []
    if metrics:
        plots.append(plot_curves({cfg.algo: metrics}, out / "training_curves.png",
                                 title=f"RL with {cfg.algo} on the demo world"))
    ks = [k for k in sft if k.startswith("pass@")]
    plots.append(plot_bars({"SFT": {k: sft[k] for k in ks}, f"RL ({cfg.algo})": {k: rl.get(k, 0) for k in ks}},
                           out / "accuracy.png", title="held-out accuracy"))
    summary = {
        "algo": cfg.algo, "steps": cfg.trainer.total_steps, "wall_seconds": round(wall, 1),
        # seconds each stage took when it was made (this invocation or, for the stages in
        # "cached", the earlier one that made them; None: made by an aepo that kept no time)
        "stage_seconds": {k: (None if v is None else round(v, 1)) for k, v in (stage_seconds or {}).items()},
        "cached": sorted(cached or ()),
        "sft_accuracy": sft.get("pass@1", 0.0), "rl_accuracy": rl.get("pass@1", 0.0),
        "gain_points": round(100 * (rl.get("pass@1", 0.0) - sft.get("pass@1", 0.0)), 1),
        "sft": sft, "rl": rl,
    }
    atomic_write_json(out / "summary.json", summary)
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})

    def pct(x: Any) -> str:
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"

    def num(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, (int, float)) else "-"

    ks_sorted = sorted(ks, key=lambda k: int(k.split("@")[1]))
    lines = [
        f"# aepo demo: {cfg.algo}", "",
        f"Held-out accuracy (pass@1) went from **{pct(summary['sft_accuracy'])}** after SFT to "
        f"**{pct(summary['rl_accuracy'])}** after {cfg.trainer.total_steps} RL steps "
        f"({summary['gain_points']:+.1f} points). Wall time {wall / 60:.1f} min"
        # from the summary's rounded seconds, so the report and summary.json never disagree
        + (" (" + ", ".join(f"{k} {'-' if v is None else f'{v:.0f} s'}{' cached' if k in summary['cached'] else ''}"
                            for k, v in summary["stage_seconds"].items()) + ")"
           if stage_seconds else "") + ".", "",
        "| model | " + " | ".join(ks_sorted) + " | F1 | tool calls | length | diversity |",
        "|---|" + "---|" * (len(ks_sorted) + 4),
    ]
    for name, s in (("SFT", sft), (f"RL ({cfg.algo})", rl)):
        lines.append(f"| {name} | " + " | ".join(pct(s.get(k)) for k in ks_sorted) +
                     f" | {pct(s.get('f1'))} | {num(s.get('tool_calls'))} | {num(s.get('response_length'))} | "
                     f"{num(s.get('diversity'))} |")
    lines += ["", "## Training", "", *training_table(first, last)]
    from aepo.rollout.analyses import analysis_stats, entropy_stats

    run_level = {**analysis_stats(metrics), **entropy_stats(metrics)} if metrics else {}
    if run_level:
        lines += ["", "Over the whole run (mean of the per-step values; see `aepo.rollout.analyses`): " + ", ".join(
            f"{k} {num(v)}" for k, v in run_level.items()) + "."]
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], "",
              "Files: `summary.json`, `rl/metrics.jsonl` (per-step metrics), `eval_*_samples.jsonl` "
              "(every rollout), `sft/` and `rl/final/` (HF model directories)."]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return out / "summary.md"


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, algo: str = "aepo", seed: int = 0,
             overrides: list[str] | None = None, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run every stage (those finished under the same settings are reused) and return the
    summary dict. A finished stage made with other settings (another algo, seed, size, config
    value) is never reported as this run's: it raises StaleOutputError naming the differences,
    or with `force` is removed and redone, with every stage after it."""
    from aepo.io import check_output_dir
    from aepo.models.loading import resolve_device

    t0 = time.time()
    out = Path(out)
    # every check before the run directory is created or any stage starts
    cfg = demo_config(algo, seed, overrides, quick=quick)
    plan = cfg.demo
    resolve_device(cfg.model.device)  # model.device=cuda without CUDA: one line, before any work
    # the models' settings name the world's corpus, so `aepo eval` of them searches it too
    cfg.tools.search_corpus = str((out / WORLD_DONE).parent.resolve() / "corpus.jsonl")
    set_threads(cfg.trainer.threads, cap=4)  # the tiny model gains nothing from more than 4
    check_output_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    stages = StageRunner(out, stage_keys(cfg, seed), force=force)
    random.seed(seed)
    torch.manual_seed(seed)
    console.print(f"[bold]aepo demo[/] -> {out}  (algo={algo}{', quick' if quick else ''})")
    world = stages.run("world", stage_world, out, plan, seed)
    runner = build_tools(world, cfg.tools)
    try:
        console.print(f"world: {len(world.corpus)} documents, {len(world.train)} train / {len(world.test)} test questions")
        init_dir, demos = stages.run("demonstrations", stage_model, out, plan, seed, cfg.tools)
        sft_dir = stages.run("SFT", stage_sft, out, init_dir, demos, cfg, seed, progress)
        test = world_tasks(world.test)[: cfg.eval.limit or None]
        train = world_tasks(world.train)
        sft = stages.run("SFT eval", stage_eval, out, "sft", sft_dir, test, runner, cfg, progress)
        console.print(f"SFT held-out pass@1: {100 * sft['pass@1']:.1f}%")
        rl_dir = stages.run("RL", stage_rl, out, sft_dir, train, runner, cfg, progress)
        rl = stages.run("RL eval", stage_eval, out, "rl", rl_dir, test, runner, cfg, progress)
        console.print(f"RL  held-out pass@1: {100 * rl['pass@1']:.1f}%")
    finally:
        runner.close()
    report = write_report(out, cfg, sft, rl, time.time() - t0, stages.seconds(), stages.cached)
    console.print(f"[bold green]report:[/] {report}")
    return json.loads((out / "summary.json").read_text())


__all__ = ["DemoPlan", "build_tools", "demo_config", "run_demo", "stage_keys", "world_tasks"]
