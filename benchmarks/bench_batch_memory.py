"""Peak memory of one flat batch: HF `generate`, the torch sampler's `generate`, and the
continuous batch (`SlotBatch`, `rollout.scheduler=continuous`).

    .venv/bin/python benchmarks/bench_batch_memory.py                       # CPU: 4 layers
    .venv/bin/python benchmarks/bench_batch_memory.py --rows 64 --layers 28  # CPU: 0.6B's depth
    PYTHONPATH=src python3 benchmarks/bench_batch_memory.py --layers 28 --dtype bfloat16   # a GPU

A Qwen3 with Qwen3-0.6B's attention (16 query / 8 key-value heads of 128), random weights, and
a small MLP and vocabulary (`--layers`, default 4 on a CPU). Keys and values per token scale
with the layers, a prefill's activations do not (one layer's at a time): with 4 layers they
weigh about 7x more against the cache than in the 28 layers of Qwen3-0.6B, so an arm whose peak
is its prefill reads higher there than at full depth. `--rows` rows
(256) of `--prompt-len` random tokens (128) each sample `--new-tokens` tokens (256; no EOS).
Each arm runs in a fresh process: on CUDA it reports `torch.cuda.max_memory_allocated` less the
weights, on a CPU the peak resident set (`ru_maxrss`) less the resident set before the call.
`kv_bytes` is what the rows' keys and values take at the end (rows x (prompt + new) tokens);
each arm's `peak / kv` is its peak over that, and `vs_hf` its peak over HF `generate`'s.
Results: benchmarks/RESULTS.md, "Continuous batching".
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ARMS = ("hf_generate", "torch_sampler", "slot_batch")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from aepo.rollout.sampler import TorchSampler
    from aepo.rollout.sampler.streams import RowKey

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    prompts = torch.randint(4, args.vocab, (args.rows, args.prompt_len), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    class Tok:  # what the sampler asks of a tokenizer with no EOS and no stop strings
        eos_token_id = None
        pad_token_id = 0

        def __len__(self) -> int:
            return args.vocab

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    with torch.inference_mode():
        if args.child == "hf_generate":
            ids = prompts.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=None, top_p=None,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            assert out.shape[1] == args.prompt_len + n
        else:
            s = TorchSampler(model, Tok(), temperature=1.0, seed=0, eos_token_ids=[], max_batch_rows=args.rows)
            rows = [s.new_row(p) for p in prompts.tolist()]
            if args.child == "torch_sampler":
                gens = s.generate(rows, n)
            else:
                batch = s.open_batch(max_rows=args.rows)
                for i, r in enumerate(rows):
                    batch.start(r, n, RowKey(0, 0, i))
                gens = []
                while batch.active:
                    gens += [g for _, g in batch.step()]
            assert len(gens) == args.rows and all(len(g.token_ids) == n for g in gens)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    per_token = 2 * args.layers * 8 * 128 * torch.tensor([], dtype=dtype).element_size()
    return {"arm": args.child, "device": device.type, "peak_bytes": int(peak),
            "kv_bytes": args.rows * (args.prompt_len + n) * per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    results = []
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("arms", "child")]
    for arm in args.arms:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", arm, *passed],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    hf = next((r["peak_bytes"] for r in results if r["arm"] == "hf_generate"), None)
    for r in results:
        r["peak_over_kv"] = round(r["peak_bytes"] / r["kv_bytes"], 2)
        r["vs_hf"] = round(r["peak_bytes"] / hf, 2) if hf else None
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
