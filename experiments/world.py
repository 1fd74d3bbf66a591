"""The embedded default: pretrain a small LLaMA-recipe model on the generated world.

No file, no network: the corpus (fact paragraphs and Question/Answer sessions about
invented countries and people, plus arithmetic) is generated in code by
flaxgpt.data.world, whose oracle can check any answer. This is the first stage of
the chat demo; SFT, the reward model and RL start from its checkpoint.

Here each of the world's 672 sums appears only a few times (against tens for each fact), so the
model cannot add. --set data.world_arithmetic=0.3 train.max_steps=2000 (drills, learnt late in the
run) teaches it to (the SFT model then answers two thirds of the held-out sums), but the RM that
starts from it still orders right and wrong sums at chance, and RL on that RM then unlearns sums:
not the default (benchmarks/RESULTS.md).
Runs in a few minutes on 2 CPU cores.
"""

from flaxgpt import config as C


def config() -> C.Config:
    return C.Config(
        model=C.ModelConfig(
            recipe="llama", n_layer=4, n_head=4, n_kv_heads=2, d_model=128, block_size=128, dropout=0.0
        ),
        data=C.DataConfig(source="world", world_seed=0, world_documents=6000, tokenizer="char"),
        optimizer=C.OptimizerConfig(
            lr=2e-3, min_lr=2e-4, warmup_steps=100, decay="cosine", b2=0.99, weight_decay=0.1, grad_clip=1.0
        ),
        train=C.TrainConfig(batch_size=16, max_steps=1200, log_interval=50),
        eval=C.EvalConfig(
            interval=400,
            iters=10,
            temperature=0.0,
            sample_prompt="Question: What is the capital of Vouzapur?\nAnswer:",
            sample_tokens=60,
        ),
        checkpoint=C.CheckpointConfig(every_steps=400),
    )
