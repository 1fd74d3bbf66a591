"""Decode throughput: the KV-cache engine versus recomputing the whole sequence every step, and
(`--hf`) versus Hugging Face transformers' `generate` on the same device.

    python benchmarks/decode.py
    python benchmarks/decode.py --model gpt2_124m --dtype bfloat16 --prompt 128 --new 256 --batches 1,64 --hf

Default: a 4-layer, 256-wide LLaMA-recipe model (random weights: speed does not depend on them),
a 16-token prompt and 256 new tokens, greedy, at batch 1 and 32. "Full recompute" is the
jitted loop without a cache: every step re-runs the model over the fixed 272-token buffer
(static shapes, as a compiled loop must), the way nanoGPT's `generate` does within its
window. Compile time is excluded (each path runs once before timing).

`--model gpt2_124m`: GPT-2 124M (vocabulary 50304, 1024 positions, biases, tied embeddings),
parameters and compute in `--dtype`. `--hf` runs the same architecture as transformers'
`GPT2LMHeadModel` (SDPA attention, random weights, greedy, no stop token, so every row makes
all `--new` tokens), in this process after flaxgpt's part, warmed up by one call per batch size.
At batch 1 the table also gives the memory-bandwidth bound: each new token reads every parameter
once, so tokens/s <= bandwidth / parameter bytes (`--hbm-bandwidth`, default the H200's 4.8 TB/s).
`--tiny` shrinks the model to check the script in seconds. Prints a table and appends it to
benchmarks/RESULTS.md (`--json` also writes the figures, for benchmarks/gpu_session.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

# transformers' torch may run in this process after JAX: let it have the memory JAX would reserve.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import record  # noqa: E402
from flaxgpt import config as C  # noqa: E402
from flaxgpt.generate import DecodeConfig, _prefill, _sliding_loop, generate, left_pad  # noqa: E402
from flaxgpt.model import Transformer, count_params  # noqa: E402

MODELS = {
    "llama_small": dict(recipe="llama", vocab_size=256, n_layer=4, n_head=8, n_kv_heads=4, d_model=256),
    "gpt2_124m": dict(recipe="gpt2", vocab_size=50304, block_size=1024, n_layer=12, n_head=12, d_model=768),
}
TINY = dict(vocab_size=256, n_layer=2, n_head=4, d_model=64)
H200_HBM_BYTES_PER_S = 4.8e12  # the datasheet's HBM3e bandwidth


def timed(fn, repeats: int = 2) -> float:
    jax.block_until_ready(fn())  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


class HFGenerate:
    """transformers' GPT2LMHeadModel of `cfg`'s shape, built once; `seconds` times its greedy `generate`."""

    def __init__(self, cfg: C.ModelConfig, dtype: str):
        import torch
        import transformers

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function="gelu_new",
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        self.model = model.to(device=self.device, dtype=getattr(torch, dtype)).eval()
        self.info = {
            "params": sum(p.numel() for p in self.model.parameters()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
        }

    def seconds(self, prompts: np.ndarray, new: int, repeats: int) -> float:
        """Seconds per call of `generate` for `new` greedy tokens after `prompts`, after one warm-up call."""
        torch = self.torch
        ids = torch.as_tensor(prompts, device=self.device)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                out = self.model.generate(ids, eos_token_id=None, **kwargs)
            if self.device == "cuda":
                torch.cuda.synchronize()
            return out

        out = run()  # warm-up: kernels, cuBLAS handles, caches
        if tuple(out.shape) != (ids.shape[0], ids.shape[1] + new):
            raise RuntimeError(f"generate made {tuple(out.shape)}, expected {(ids.shape[0], ids.shape[1] + new)}")
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_small", choices=sorted(MODELS))
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="new tokens (greedy)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="params and compute")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per path and batch")
    parser.add_argument("--hf", action="store_true", help="compare with transformers' generate (gpt2_124m)")
    parser.add_argument(
        "--recompute", action=argparse.BooleanOptionalAction, default=None, help="the full recompute column"
    )
    parser.add_argument("--hbm-bandwidth", type=float, default=H200_HBM_BYTES_PER_S, help="bytes/s for the bound")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same recipe (checks the script)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    recompute = args.recompute if args.recompute is not None else args.model == "llama_small"
    if args.hf and MODELS[args.model]["recipe"] != "gpt2":
        parser.error("--hf compares GPT-2-recipe models only (transformers' GPT2LMHeadModel): use --model gpt2_124m")
    fields = dict(MODELS[args.model], block_size=args.prompt + args.new, dtype=args.dtype, param_dtype=args.dtype)
    if args.model == "gpt2_124m":  # GPT-2's own 1024 positions (the prompt and new tokens must fit)
        fields["block_size"] = max(1024, args.prompt + args.new)
    if args.tiny:
        fields.update(TINY, block_size=args.prompt + args.new)
        if fields.get("n_kv_heads"):
            fields["n_kv_heads"] = 2
    cfg = C.ModelConfig(**fields).resolved()
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.block_size), jnp.int32))["params"])
    n_params = count_params(params)
    param_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    bound = args.hbm_bandwidth / param_bytes  # batch-1 tokens/s if each token reads every parameter once
    decode = DecodeConfig(max_new_tokens=args.new, temperature=0.0)
    device = jax.devices()[0]
    batches = [int(b) for b in args.batches.split(",")]
    rows, hf_info = [], None
    for batch in batches:
        prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, args.prompt))
        listed = prompts.tolist()
        tokens, mask = left_pad(listed, 0)
        cached = timed(
            lambda: generate(model, params, listed, decode, jax.random.PRNGKey(0), pad_id=0).tokens,
            repeats=args.repeats,
        )
        prefill = jax.jit(lambda p, t, m: _prefill(model, p, t, m, args.prompt + args.new)[0])
        prefill_s = timed(lambda: prefill(params, jnp.asarray(tokens), jnp.asarray(mask)), repeats=5)
        row = {"batch": batch, "ours": batch * args.new / cached, "seconds": cached, "prefill_s": prefill_s}
        if recompute:
            buffer = jnp.zeros((batch, args.prompt + args.new), jnp.int32).at[:, : args.prompt].set(jnp.asarray(tokens))
            full = timed(
                lambda: _sliding_loop(
                    model,
                    params,
                    buffer,
                    jax.random.PRNGKey(0),
                    prompt_len=args.prompt,
                    max_new_tokens=args.new,
                    cfg=decode,
                ),
                repeats=1,
            )
            row["recompute"] = batch * args.new / full
        row["prompts"] = prompts
        rows.append(row)
        print(f"batch {batch}: flaxgpt {row['ours']:,.0f} tokens/s", flush=True)
    if args.hf:
        try:
            hf = HFGenerate(cfg, args.dtype)
            hf_info = hf.info
            for row in rows:
                row["hf"] = row["batch"] * args.new / hf.seconds(row["prompts"], args.new, args.repeats)
                print(f"batch {row['batch']}: transformers {row['hf']:,.0f} tokens/s", flush=True)
        except Exception as e:  # noqa: BLE001 - flaxgpt's rows stand without it; say why
            print(f"transformers generate failed: {type(e).__name__}: {e}", file=sys.stderr)
    for row in rows:
        row.pop("prompts")

    hf_versions = f", torch {hf_info['torch']}, transformers {hf_info['transformers']}" if hf_info else ""
    command = " ".join(["python benchmarks/decode.py", *sys.argv[1:]])
    lines = [
        f"## decode — {datetime.date.today()} — {platform.machine()}, {device.platform} ({device.device_kind}), "
        f"jax {jax.__version__}{hf_versions}; {args.model}{' (tiny)' if args.tiny else ''} "
        f"{n_params / 1e6:.1f}M params in {args.dtype}, prompt {args.prompt}, {args.new} new tokens, greedy",
        f"command: `{command}`",
        "",
        "| batch | KV cache tokens/s | prefill ms | decode ms | ms per new token"
        + (" | full recompute tokens/s | speed-up" if recompute else "")
        + (" | transformers tokens/s | flaxgpt / transformers" if args.hf else "")
        + " |",
        "|---|---|---|---|---" + ("|---|---" if recompute else "") + ("|---|---" if args.hf else "") + "|",
    ]
    for r in rows:
        line = (
            f"| {r['batch']} | {r['ours']:,.0f} | {r['prefill_s'] * 1e3:.1f} | "
            f"{(r['seconds'] - r['prefill_s']) * 1e3:.0f} | {r['seconds'] / args.new * 1e3:.3f}"
        )
        if recompute:
            line += f" | {r['recompute']:,.0f} | {r['ours'] / r['recompute']:.1f}x"
        if args.hf:
            hf = r.get("hf")
            line += f" | {hf:,.0f} | {r['ours'] / hf:.2f}x" if hf else " | — | —"
        lines.append(line + " |")
    one = next((r for r in rows if r["batch"] == 1), None)
    h200 = args.hbm_bandwidth == H200_HBM_BYTES_PER_S
    if one:
        lines += [
            "",
            f"batch 1 against the memory-bandwidth bound: {param_bytes / 1e6:,.1f} MB of parameters read per token "
            f"/ {args.hbm_bandwidth / 1e12:.2f} TB/s{' (the H200 datasheet)' if h200 else ''} = {bound:,.0f} "
            "tokens/s at most; flaxgpt reaches "
            f"{one['ours'] / bound:.1%} of it" + (f", transformers {one['hf'] / bound:.1%}" if one.get("hf") else ""),
        ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "conditions": {
                        "device_kind": device.device_kind,
                        "jax": jax.__version__,
                        "model": args.model,
                        "tiny": args.tiny,
                        "dtype": args.dtype,
                        "prompt": args.prompt,
                        "new": args.new,
                        "command": command,
                        **({k: hf_info[k] for k in ("torch", "transformers", "params")} if hf_info else {}),
                    },
                    "params": n_params,
                    "param_bytes": param_bytes,
                    "hbm_bandwidth": args.hbm_bandwidth,
                    "batch1_bound": bound,
                    "rows": rows,
                    "table": text,
                },
                f,
                indent=1,
            )
    if not args.no_record:
        record(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
