"""LoRA SFT of a Llama-3-8B-shaped model on a TPU v5e-16 (16 chips of 16 GiB: v5e:4x4).

    python -m flaxgpt.compile -e llama3_8b_lora_v5e16 --topology v5e:4x4
    python -m flaxgpt.train -e llama3_8b_lora_v5e16 --set train.init_from_hf=/path/to/Meta-Llama-3-8B \\
        data.path=chats.jsonl

Differs from the defaults, and why:
  model      Llama-3-8B's shape (see llama3_8b_sft_v5p64) with rank-16 adapters on every
             projection: only the adapters (~42M parameters) train and carry Adam state; the frozen
             base stays float32 (32 GB, 2 GiB a chip; bfloat16 storage would halve it, but the
             train step's finite-update guard does not trace with bfloat16 parameters yet: Adam's
             moments come out float32), compute in bfloat16; layers scanned, rematerialised in full
  mesh       fsdp over the 16 chips
  optimizer  LoRA's usual lr 2e-4 -> 2e-5, no weight decay
  train      32 packed rows of 4096 tokens per step
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
            lora_rank=16,
            lora_alpha=32.0,
        ),
        mesh=C.MeshConfig(data=1, fsdp=-1, tensor=1),
        data=C.DataConfig(source="jsonl", path="data/chats.jsonl", packing="pack"),
        optimizer=C.OptimizerConfig(lr=2e-4, min_lr=2e-5, warmup_steps=100, weight_decay=0.0, grad_clip=1.0),
        train=C.TrainConfig(trainer="sft", init_from_hf="checkpoints/Meta-Llama-3-8B", batch_size=32, max_steps=2000),
        sft=C.SftConfig(eval_examples=64, max_new_tokens=256),
        eval=C.EvalConfig(interval=500, iters=10),
        checkpoint=C.CheckpointConfig(every_steps=500),
    )
