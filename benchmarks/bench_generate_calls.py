"""The torch sampler on the generate calls of real demo rollouts, replayed.

    .venv/bin/python benchmarks/bench_generate_calls.py record runs/demo runs/calls.json
    .venv/bin/python benchmarks/bench_generate_calls.py replay runs/demo runs/calls.json [--repeats 4]

`record` runs four AEPO rollout steps of the demo (its world, SFT model and config) and writes,
for each `generate` call, every row's cached and pending lengths and how many tokens it
generated. `replay` builds rows of those lengths (random ids and cache contents) on the demo's
model and runs each call with those token counts (no stop strings), alternating the sampler as
it is with the sampler prefilling each call in one padded pass (rows in the caller's order), and
prints the median seconds of each. Results go to benchmarks/RESULTS.md ("Padding left in the
rollout").
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def record(demo: Path, path: Path) -> None:
    from aepo.config import load_config
    from aepo.demo.stages import DEMO_CONFIG, build_tools, world_tasks
    from aepo.demo.world import World
    from aepo.models.loading import load_model
    from aepo.rollout.sampler import torch_sampler
    from aepo.train.rl import RLTrainer

    calls = []
    inner = torch_sampler.TorchSampler._generate_batch

    def recorded(self, handles, budgets, spec):  # type: ignore[no-untyped-def]
        states = [self._rows[h] for h in handles]
        cached = [min(s.n_cached, len(s.ids) - 1) for s in states]
        outs = inner(self, handles, budgets, spec)
        calls.append({"cached": cached, "pending": [len(s.ids) - c for s, c in zip(states, cached)],
                      "generated": [len(o.token_ids) for o in outs]})
        return outs

    torch_sampler.TorchSampler._generate_batch = recorded
    out = Path(str(path) + ".rl")
    cfg = load_config(DEMO_CONFIG, ["algo=aepo", "trainer.save_every=0", f"out_dir={out}"])
    model, tok = load_model(demo / "sft", device="cpu")
    world = World.load(demo / "world")
    runner = build_tools(world, cfg.tools)
    try:
        trainer = RLTrainer(cfg, model, tok, world_tasks(world.train), runner.run, out)
        for step in range(4):
            trainer.collect(step)
    finally:
        runner.close()
    path.write_text(json.dumps(calls))
    print(f"{len(calls)} generate calls -> {path}")


def replay(demo: Path, path: Path, repeats: int) -> None:
    from aepo.models.loading import load_model
    from aepo.rollout.sampler import TorchSampler, lean, torch_sampler
    from aepo.rollout.sampler.rows import Row

    calls = json.loads(path.read_text())
    model, tok = load_model(demo / "sft", device="cpu")
    config = model.config
    shape = (config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    gen = torch.Generator().manual_seed(0)
    overhead, by_length = lean.PREFILL_PASS_OVERHEAD_TOKENS, torch_sampler.TorchSampler._generate_batch

    def run(single_pass: bool) -> float:
        lean.PREFILL_PASS_OVERHEAD_TOKENS = 10**12 if single_pass else overhead
        TorchSampler._generate_batch = TorchSampler._generate_rows if single_pass else by_length
        sampler = TorchSampler(model, tok, temperature=0.7, seed=0, eos_token_ids=[])
        seconds = 0.0
        for call in calls:
            handles = []
            for c, p in zip(call["cached"], call["pending"]):
                ids = torch.randint(10, len(tok), (c + p,), generator=gen).tolist()
                layers, heads, head_dim = shape
                chunks = [(torch.randn(layers, heads, c, head_dim, generator=gen),
                           torch.randn(layers, heads, c, head_dim, generator=gen))] if c else []
                handles.append(sampler._add(Row(ids=ids, chunks=chunks, n_cached=c)))
            t0 = time.perf_counter()
            sampler.generate(handles, call["generated"])
            seconds += time.perf_counter() - t0
        return seconds

    run(False)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for single in (True, False):
            times[single].append(run(single))
    print(f"{len(calls)} calls; one padded pass: {statistics.median(times[True]):.2f} s, "
          f"passes of similar lengths: {statistics.median(times[False]):.2f} s (median of {repeats})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "replay"])
    ap.add_argument("demo", type=Path, help="a finished `aepo demo` directory")
    ap.add_argument("calls", type=Path, help="the recorded calls (JSON)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "record":
        record(args.demo, args.calls)
    else:
        replay(args.demo, args.calls, args.repeats)


if __name__ == "__main__":
    main()
