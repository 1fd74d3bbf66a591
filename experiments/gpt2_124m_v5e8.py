"""GPT-2 124M on a TPU v5e-8, nanoGPT's OpenWebText recipe (config/train_gpt2.py).

    python -m flaxgpt.compile -e gpt2_124m_v5e8 --topology v5e:2x4      # fits? (no TPU needed)
    python -m flaxgpt.train -e gpt2_124m_v5e8 --set data.tfds_data_dir=gs://BUCKET/tfds

Differs from the defaults, and why:
  model      GPT-2 small: 12 layers, 12 heads, d_model 768, context 1024, vocabulary 50257
             padded to 50304 (nanoGPT's multiple of 64; here a multiple of 128 for the MXU),
             bfloat16 compute over float32 parameters (TPU matmuls run in bfloat16)
  optimizer  nanoGPT's: lr 6e-4 -> 6e-5 cosine over 600k steps, 2000 warm-up, beta2 0.95, wd 0.1
  train      480 sequences of 1024 (~0.5M tokens) per step, as nanoGPT's 8 GPUs x 12 x 40 micro-
             steps; here 4 micro-batches of 120 (15 rows per chip: about 10 GiB of 16 with remat)
  mesh       pure data parallelism over the 8 chips (parameters and Adam state fit replicated)
  data       an OpenWebText TFDS copy in array_record and a 50257-piece BPE tokenizer
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        model=C.ModelConfig(
            recipe="gpt2",
            n_layer=12,
            n_head=12,
            d_model=768,
            block_size=1024,
            vocab_size=50304,
            dtype="bfloat16",
            remat="dots_no_batch",
        ),
        mesh=C.MeshConfig(data=-1, fsdp=1, tensor=1),
        data=C.DataConfig(source="tfds", tfds_name="openwebtext", tokenizer="sentencepiece", spm_vocab_size=50257),
        optimizer=C.OptimizerConfig(
            lr=6e-4, min_lr=6e-5, warmup_steps=2000, decay="cosine", b2=0.95, weight_decay=0.1, grad_clip=1.0
        ),
        train=C.TrainConfig(batch_size=480, grad_accum_steps=4, max_steps=600_000, log_interval=10),
        eval=C.EvalConfig(interval=1000, iters=200, batch_size=64),
        checkpoint=C.CheckpointConfig(every_steps=5000),
    )
