"""A Llama-style 1.1B model (TinyLlama's shape: 22 layers, d_model 2048, 32 query / 4 key-value
heads, SwiGLU 5632, context 2048) pretrained on a mixture: 70 % web, 20 % code, 10 % conversations.

Each source is prepared once with the same tokenizer (the first one's, e.g. an imported Llama
tokenizer), then the mixture samples rows by weight, deterministically from (seed, step, row):

    python -m flaxgpt.data.prepare --out data/web --jsonl web.jsonl --tokenizer-from path/to/hf/llama
    python -m flaxgpt.data.prepare --out data/code --jsonl code.jsonl --tokenizer-from data/web
    python -m flaxgpt.data.prepare --out data/chat --jsonl chat.jsonl --tokenizer-from data/web
    python -m flaxgpt.train -e llama_1b_mixture --set mesh.fsdp=-1 mesh.data=1

Checkpoints record each source's rows, tokens and epoch so far; metrics.jsonl rows (and the
closing lines) carry the tokens each source has given: tokens/web, tokens/code, tokens/chat.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        name="llama_1b_mixture",
        model=C.ModelConfig(
            recipe="llama",
            n_layer=22,
            n_head=32,
            n_kv_heads=4,
            d_model=2048,
            d_ff=5632,
            block_size=2048,
            vocab_multiple=128,
            dtype="bfloat16",
            scan_layers=True,
            remat="full",
        ),
        data=C.DataConfig(
            source="tokens",
            mixture=(
                {"path": "data/web", "weight": 0.7},
                {"path": "data/code", "weight": 0.2},
                {"path": "data/chat", "weight": 0.1},
            ),
        ),
        optimizer=C.OptimizerConfig(
            lr=4e-4, min_lr=4e-5, warmup_steps=2000, decay="cosine", b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0
        ),
        train=C.TrainConfig(batch_size=512, max_steps=100000, log_interval=10),
        eval=C.EvalConfig(interval=2000, iters=50, sample_prompt="The", sample_tokens=100),
        checkpoint=C.CheckpointConfig(every_steps=1000, max_to_keep=3),
    )
