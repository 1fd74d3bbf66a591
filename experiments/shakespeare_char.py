"""nanoGPT's shakespeare_char run in its CPU configuration (config/train_shakespeare_char.py
with the README's CPU overrides): a 0.8M-parameter character model.

As nanoGPT: GPT-2 recipe without biases (its default bias=False) and weight decay on
every 2-D tensor, embeddings included. nanoGPT reports val loss 1.88 at iteration 2000
from 20 random validation batches; we average 200 fixed ones (about the whole split),
which measures the model rather than the draw. Point data.path at tiny shakespeare
(karpathy/char-rnn's input.txt), e.g. --set data.path=/path/to/input.txt.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        model=C.ModelConfig(
            recipe="gpt2", n_layer=4, n_head=4, d_model=128, block_size=64, dropout=0.0, use_bias=False
        ),
        data=C.DataConfig(source="text", path="../shared/data/tinyshakespeare.txt", tokenizer="char"),
        optimizer=C.OptimizerConfig(
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=100,
            decay="cosine",
            b1=0.9,
            b2=0.99,
            weight_decay=0.1,
            no_decay=("bias", "scale"),
            grad_clip=1.0,
        ),
        train=C.TrainConfig(batch_size=12, max_steps=2000, log_interval=10),
        eval=C.EvalConfig(interval=250, iters=200, sample_prompt="\n", sample_tokens=300),
        checkpoint=C.CheckpointConfig(every_steps=500),
    )
