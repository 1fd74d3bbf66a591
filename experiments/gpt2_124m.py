"""GPT-2 124M on OpenWebText: nanoGPT's config/train_gpt2.py recipe (batch 480 x 1024 tokens,
about 0.5M tokens per step, lr 6e-4 cosine to 6e-5 over 600k steps, 2k warmup, weight decay 0.1,
beta2 0.95, grad clip 1), streamed from pre-tokenized shards.

Prepare the corpus once (GPT-2's own tokenizer from an imported Hugging Face gpt2 directory;
OpenWebText as JSONL documents or as a prepared TFDS dataset):

    python -m flaxgpt.data.prepare --out data/openwebtext --jsonl openwebtext.jsonl \\
        --tokenizer-from path/to/hf/gpt2 --val-fraction 0.0005
    python -m flaxgpt.train -e gpt2_124m --set mesh.data=-1

nanoGPT's 480 rows are 12 per device x 5 accumulation steps x 8 GPUs; here the global batch
is one number and train.grad_accum_steps splits it as memory requires.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        name="gpt2_124m",
        model=C.ModelConfig(
            recipe="gpt2",
            n_layer=12,
            n_head=12,
            d_model=768,
            block_size=1024,
            vocab_size=50304,  # GPT-2's 50257 ids rounded up to a multiple of 64, as nanoGPT does
            use_bias=False,
            dtype="bfloat16",
        ),
        data=C.DataConfig(source="tokens", path="data/openwebtext"),
        optimizer=C.OptimizerConfig(
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=2000,
            decay="cosine",
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            no_decay=("bias", "scale"),  # nanoGPT decays every 2-D tensor, embeddings included
            grad_clip=1.0,
        ),
        train=C.TrainConfig(batch_size=480, grad_accum_steps=5, max_steps=600000, log_interval=10),
        eval=C.EvalConfig(interval=2000, iters=200, sample_prompt="\n", sample_tokens=100),
        checkpoint=C.CheckpointConfig(every_steps=2000, max_to_keep=3),
    )
