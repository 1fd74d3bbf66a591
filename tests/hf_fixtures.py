"""Small randomly initialised Hugging Face models of both families, with their tokenizers, built
offline on the CPU: the independent implementation flaxgpt's import and export are checked against."""

from __future__ import annotations

import os

TEXT = (
    "What is two plus three? Five. The cat sat on the mat. " * 20
    + "Answer briefly: which colour is the sky? Blue. " * 20
)


def gpt2_dir(directory: str, n_layer: int = 2, seed: int = 0) -> str:
    """GPT2LMHeadModel (byte-level BPE tokenizer.json, <|endoftext|> as end of text)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT],
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(os.path.join(directory, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=128,
        n_embd=32,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(directory, safe_serialization=True)
    return directory


def llama_dir(
    directory: str, n_layer: int = 2, seed: int = 0, tie: bool = False, family: str = "Llama", **extra
) -> str:
    """`family`ForCausalLM (Llama, Qwen2, Qwen3, Mistral) with grouped-query attention, odd head
    counts, the config keys in `extra` (rope_scaling, sliding_window...) and a SentencePiece
    tokenizer.model."""
    import sentencepiece as spm
    import torch
    import transformers

    os.makedirs(directory, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split(". ")),
        model_prefix=os.path.join(directory, "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    config = getattr(transformers, f"{family}Config")(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # non-trivial norm scales and biases, so a misplaced one shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def hf_logits(directory: str, ids: list[int]):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def peft_logits(base: str, adapter: str, ids: list[int]):
    """Logits of a PEFT LoRA adapter loaded by peft onto a transformers base model."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(directory: str, ids: list[int], new_tokens: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            min_new_tokens=new_tokens,
            pad_token_id=model.config.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


def flaxgpt_logits(loaded, ids: list[int]):
    """flaxgpt's logits [length, vocab] of one sequence, from an `inference.load`ed model."""
    import numpy as np

    return np.asarray(loaded.model.apply({"params": loaded.params}, np.array([ids])))[0]


def flaxgpt_greedy(loaded, ids: list[int], new_tokens: int) -> list[int]:
    """flaxgpt's greedy continuation through the generation engine (KV cache), no stop tokens."""
    import jax
    import numpy as np

    from flaxgpt import generate

    out = generate.generate(
        loaded.model,
        loaded.params,
        [ids],
        generate.DecodeConfig(max_new_tokens=new_tokens, temperature=0),
        jax.random.PRNGKey(0),
        pad_id=loaded.tokenizer.pad_id,
        stop_tokens=[],
    )
    return np.asarray(out.tokens)[0].tolist()
