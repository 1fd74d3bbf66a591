"""Pretrain a small LLaMA-recipe model on your own JSONL documents ({"text": ...} per line).

    python -m flaxgpt.train -e pretrain_jsonl --set data.path=train.jsonl [data.val_path=val.jsonl]

Documents are packed into rows with segment ids; a 4096-piece BPE SentencePiece model is
trained into the workdir on first run. Exact duplicates are dropped. Scale the model, the
batch and the mesh with --set (e.g. mesh.fsdp=-1 mesh.data=1 on a pod).
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        model=C.ModelConfig(
            recipe="llama",
            n_layer=8,
            n_head=8,
            n_kv_heads=4,
            d_model=512,
            block_size=512,
            vocab_multiple=128,
            scan_layers=True,
        ),
        data=C.DataConfig(
            source="jsonl",
            path="data/train.jsonl",
            packing="pack",
            tokenizer="sentencepiece",
            spm_vocab_size=4096,
            spm_model_type="bpe",
            dedup=True,
        ),
        optimizer=C.OptimizerConfig(
            lr=6e-4, min_lr=6e-5, warmup_steps=500, decay="cosine", b2=0.95, weight_decay=0.1, grad_clip=1.0
        ),
        train=C.TrainConfig(batch_size=64, max_steps=20000, log_interval=20),
        eval=C.EvalConfig(interval=1000, iters=20, sample_prompt="The", sample_tokens=100),
        checkpoint=C.CheckpointConfig(every_steps=1000, max_to_keep=3),
    )
