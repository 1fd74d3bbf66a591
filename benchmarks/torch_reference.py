"""The same GPT and training step written plainly in PyTorch eager: the reference that
`benchmarks/train_throughput.py` measures flaxgpt against, side by side.

It is nanoGPT's model.py in miniature: pre-norm blocks, causal self-attention through
`scaled_dot_product_attention`, tanh-GELU MLP, tied embeddings, AdamW with decay on 2-D
tensors, global-norm clipping. torch comes from the CPU wheel on disk (`pip install torch==2.13.0`).
On a GPU (device="cuda") it runs as a PyTorch user would write it there: bfloat16 autocast,
flash attention through `scaled_dot_product_attention`, fused AdamW. `compile=True` (`--compile`)
wraps the model in `torch.compile` as nanoGPT does (the optimizer step stays eager); its
compilation happens in the warm-up steps, which are not timed.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.mlp_proj = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, d_model: int, bias: bool = False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class Trainer:
    """The reference training step on random token batches; `time(steps)` runs and times them."""

    def __init__(
        self,
        vocab: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        batch: int,
        warmup: int = 3,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.model = GPT(vocab, block_size, n_layer, n_head, d_model).to(self.device)
        self.forward = torch.compile(self.model, backend=compile_backend) if compile else self.model
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
            betas=(0.9, 0.99),
            fused=self.device.type == "cuda",
            foreach=self.device.type != "cuda",
        )
        gen = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (20, batch, block_size + 1), generator=gen).to(self.device)
        self.tokens_per_step = batch * block_size
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.calls = 0
        self.warmup_s = self.time(warmup)  # includes torch.compile's compilation when compiling

    def step(self) -> torch.Tensor:
        batch = self.data[self.calls % len(self.data)]
        self.calls += 1
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.forward(batch[:, :-1], batch[:, 1:])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss

    def time(self, steps: int) -> float:
        """Seconds for `steps` steps, up to the last step's loss on the host."""
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        return time.perf_counter() - start


def main() -> None:
    """Best-of-rounds tokens/s as JSON, in a process of its own: PyTorch as shipped (the
    default glibc allocator), for `benchmarks/train_throughput.py`'s second PyTorch column."""
    import argparse
    import json

    parser = argparse.ArgumentParser()
    for name in ("vocab", "block_size", "n_layer", "n_head", "d_model", "batch", "steps", "rounds"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (nanoGPT's --compile)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick dry run)")
    args = parser.parse_args()
    trainer = Trainer(
        args.vocab,
        args.block_size,
        args.n_layer,
        args.n_head,
        args.d_model,
        args.batch,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        compile_backend=args.compile_backend,
    )
    best = min(trainer.time(args.steps) for _ in range(args.rounds))
    print(
        json.dumps(
            {
                "tokens_per_sec": args.steps * trainer.tokens_per_step / best,
                "version": torch.__version__,
                "threads": torch.get_num_threads(),
                "warmup_s": trainer.warmup_s,
                "compiled": args.compile,
                "backend": args.compile_backend if args.compile else None,
                "batch": args.batch,
            }
        )
    )


if __name__ == "__main__":
    main()
