"""Full SFT of a Llama-3-8B-shaped model on a TPU v5p-64 (64 chips: v5p:4x4x4).

    python -m flaxgpt.compile -e llama3_8b_sft_v5p64 --topology v5p:4x4x4
    python -m flaxgpt.train -e llama3_8b_sft_v5p64 --set train.init_from_hf=/path/to/Meta-Llama-3-8B \\
        data.path=chats.jsonl

Differs from the defaults, and why:
  model      Llama-3-8B's shape: 32 layers, d_model 4096, 32 query / 8 key-value heads, SwiGLU 14336,
             vocabulary 128256, RoPE theta 500000, context 4096; bfloat16 compute over float32
             parameters and Adam (16 bytes a parameter: 128 GB, only sharded does it fit);
             layers scanned (one compiled layer: compile time independent of depth) and
             rematerialised in full (activations of 64 x 4096 tokens would not fit otherwise)
  mesh       fsdp over all 64 chips: parameters, gradients and Adam state 1/64 each (2 GiB a chip)
  optimizer  the usual full-SFT settings: lr 2e-5 -> 2e-6 cosine, 100 warm-up, no weight decay
  train      64 packed rows of 4096 tokens (~262k tokens) per step
  data       your conversations as JSONL, starting from the Hugging Face checkpoint
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        model=C.ModelConfig(
            recipe="llama",
            n_layer=32,
            d_model=4096,
            n_head=32,
            n_kv_heads=8,
            d_ff=14336,
            vocab_size=128256,
            rope_theta=500000.0,
            block_size=4096,
            dtype="bfloat16",
            scan_layers=True,
            remat="full",
        ),
        mesh=C.MeshConfig(data=1, fsdp=-1, tensor=1),
        data=C.DataConfig(source="jsonl", path="data/chats.jsonl", packing="pack"),
        optimizer=C.OptimizerConfig(lr=2e-5, min_lr=2e-6, warmup_steps=100, weight_decay=0.0, grad_clip=1.0),
        train=C.TrainConfig(trainer="sft", init_from_hf="checkpoints/Meta-Llama-3-8B", batch_size=64, max_steps=2000),
        sft=C.SftConfig(eval_examples=64, max_new_tokens=256),
        eval=C.EvalConfig(interval=500, iters=10),
        checkpoint=C.CheckpointConfig(every_steps=500),
    )
