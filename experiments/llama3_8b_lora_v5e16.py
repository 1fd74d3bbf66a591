"""LoRA SFT of a Llama-3-8B-shaped model on a TPU v5e-16 (16 chips of 16 GiB: v5e:4x4).

    python -m flaxgpt.compile -e llama3_8b_lora_v5e16 --topology v5e:4x4
    python -m flaxgpt.train -e llama3_8b_lora_v5e16 --set train.init_from_hf=/path/to/Meta-Llama-3-8B \\
        data.path=chats.jsonl

Differs from the defaults, and why:
  model      Llama-3-8B's shape (see llama3_8b_sft_v5p64) with rank-16 adapters on every
             projection: only the adapters (~42M parameters) train and carry Adam state; the frozen
             base stays float32 (32 GB, 2 GiB a chip; `model.param_dtype=bfloat16` halves it),
             compute in bfloat16; layers scanned, rematerialised in full
  mesh       fsdp over the 16 chips
  optimizer  LoRA's usual lr 2e-4 -> 2e-5, no weight decay
  train      32 packed rows of 4096 tokens per step
"""

import dataclasses

from flaxgpt import config as C
from flaxgpt.train import load_experiment


def config() -> C.Config:
    full = load_experiment("llama3_8b_sft_v5p64")  # the model, data and schedule shape
    return dataclasses.replace(
        full,
        name="llama3_8b_lora_v5e16",
        model=dataclasses.replace(full.model, lora_rank=16, lora_alpha=32.0),
        optimizer=dataclasses.replace(full.optimizer, lr=2e-4, min_lr=2e-5),
        train=dataclasses.replace(full.train, batch_size=32),
    )
