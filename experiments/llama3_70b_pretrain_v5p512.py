"""Pretraining a Llama-3-70B-shaped model on a TPU v5p-512 (512 chips: v5p:8x8x8).

    python -m flaxgpt.compile -e llama3_70b_pretrain_v5p512 --topology v5p:8x8x8
    python -m flaxgpt.train -e llama3_70b_pretrain_v5p512 --set data.tfds_data_dir=gs://BUCKET/tfds

Differs from the defaults, and why:
  model      Llama-3-70B's shape: 80 layers, d_model 8192, 64 query / 8 key-value heads, SwiGLU
             28672, vocabulary 128256, RoPE theta 500000, context 4096; bfloat16 compute over
             float32 parameters and Adam (1.1 TB of state); layers scanned (one compiled layer)
             and rematerialised in full
  mesh       fsdp 128 x tensor 4: parameters and Adam state split 512 ways; tensor parallelism
             inside groups of 4 chips splits heads and the MLP, so each chip's activations are a
             quarter as wide and fsdp's all-gathers move a quarter of the weights
  train      512 sequences of 4096 (2M tokens) per step, Llama-style lr 1.5e-4 -> 1.5e-5
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        model=C.ModelConfig(
            recipe="llama",
            n_layer=80,
            d_model=8192,
            n_head=64,
            n_kv_heads=8,
            d_ff=28672,
            vocab_size=128256,
            rope_theta=500000.0,
            block_size=4096,
            dtype="bfloat16",
            scan_layers=True,
            remat="full",
        ),
        mesh=C.MeshConfig(data=1, fsdp=-1, tensor=4),
        data=C.DataConfig(source="tfds", tfds_name="c4/en", tokenizer="sentencepiece", spm_vocab_size=128000),
        optimizer=C.OptimizerConfig(lr=1.5e-4, min_lr=1.5e-5, warmup_steps=2000, b2=0.95, weight_decay=0.1),
        train=C.TrainConfig(batch_size=512, max_steps=500_000, log_interval=10),
        eval=C.EvalConfig(interval=2000, iters=10, batch_size=512, sample_tokens=64),
        checkpoint=C.CheckpointConfig(every_steps=1000),
    )
