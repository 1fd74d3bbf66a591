"""One typed configuration tree for every flaxgpt run.

An experiment file builds a `Config`; the command line overrides leaves with
`--set section.key=value`. Values are parsed by the field's declared type, so a
typo or a wrong type fails before any work starts, naming the key and the
closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from flaxgpt.errors import UserError


class ConfigError(UserError):
    """A configuration problem the user can fix: names the key and what was expected."""


# ----------------------------------------------------------------------------- sections

LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")


@dataclass(unsafe_hash=True)  # hashable: the model (and so jit's static args) holds it
class ModelConfig:
    """The Transformer. Fields left at None take the value of `recipe`.

    gpt2: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
    llama: rotary positions, RMSNorm, SwiGLU MLP, no biases, untied output head.
    """

    recipe: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 0  # 0: taken from the tokenizer, rounded up to vocab_multiple
    vocab_multiple: int = 1  # e.g. 128: shardable, matmul-friendly; padded ids are never targets
    # ids >= valid_vocab (the padding) get logit -1e9: never sampled, no probability mass (0: all valid)
    valid_vocab: int = 0
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_heads: int | None = None  # None: n_head (plain MHA); 1: multi-query
    d_model: int = 128
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int | None = None  # None: 4*d_model (gpt2) or 8/3*d_model rounded to 64 (llama)
    position: Literal["learned", "rope"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu", "geglu"] | None = None
    use_bias: bool | None = None
    tie_embeddings: bool | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rotary frequency scaling for contexts beyond pretraining (Llama 3.x and others): none;
    # linear (every frequency / rope_factor); llama3 (low frequencies / rope_factor, high ones
    # kept, a smooth ramp between, set by rope_low/high_freq_factor and rope_original_context);
    # yarn (YaRN, Qwen and others: a ramp between the dimensions rotating more than
    # rope_beta_fast and fewer than rope_beta_slow times over rope_original_context, and
    # cos/sin scaled by rope_attention_factor; 0: YaRN's 0.1 ln(rope_factor) + 1)
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0
    qkv_bias: bool | None = None  # biases on query/key/value only (Qwen2); None: as use_bias
    qk_norm: bool = False  # a norm over head_dim on each query and key head, before rotary (Qwen3)
    sliding_window: int = 0  # > 0: a query sees only the last sliding_window keys (Mistral); 0: all
    global_every: int = 0  # with sliding_window: every k-th layer attends globally (Gemma 2: 2); 0: none
    # Gemma: norms scale by (1 + w) (w stored, starting at 0), embeddings times sqrt(d_model);
    # Gemma 2 adds a norm after each attention and MLP branch (post_norms), soft-capped attention
    # scores and logits (cap * tanh(x / cap); 0: none) and scores scaled by
    # query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (0: head_dim)
    norm_plus_one: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    query_pre_attn_scalar: int = 0
    dropout: float = 0.0
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = False
    # attention kernel. auto: cuDNN's fused (flash) attention where it applies (NVIDIA GPU,
    # bfloat16 compute, head_dim <= 128, no attention dropout while training), XLA's einsums
    # elsewhere; cudnn: the fused kernel or an error saying why not; xla: always the einsums.
    # KV-cache decoding always uses the einsums (one query row: nothing for a fused kernel to win).
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # the einsum path's query block while training and scoring (not KV-cache decoding): each block
    # of queries attends to the keys up to its last row, skipping the masked triangle (half the
    # work at long sequences). 0: auto, max(64, length // 8); >= block_size: one block.
    attention_block: int = 0
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention_out"] = "none"
    # logits: a language model; scalar: one number per position from a `score` head on the
    # final hidden state (reward and value models), no vocabulary head
    output: Literal["logits", "scalar"] = "logits"
    # LoRA: low-rank adapters (rank > 0) on the projections named in lora_targets (query, key,
    # value, out, gate, up, down); with adapters on, only they (and a new score head) train.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is (alpha / rank) * x A B
    lora_dropout: float = 0.0
    lora_targets: tuple = ("query", "key", "value", "out", "gate", "up", "down")

    def resolved(self) -> ModelConfig:
        """A copy with every recipe-dependent field filled in and checked."""
        check_ranges(self, "model.")
        gpt2 = self.recipe == "gpt2"
        head_dim = self.head_dim or (self.d_model // max(self.n_head, 1))
        if self.d_ff is not None:
            d_ff = self.d_ff
        elif gpt2:
            d_ff = 4 * self.d_model
        else:
            d_ff = 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        out = dataclasses.replace(
            self,
            n_kv_heads=self.n_kv_heads or self.n_head,
            head_dim=head_dim,
            d_ff=d_ff,
            position=self.position or ("learned" if gpt2 else "rope"),
            norm=self.norm or ("layernorm" if gpt2 else "rmsnorm"),
            mlp=self.mlp or ("gelu" if gpt2 else "swiglu"),
            use_bias=gpt2 if self.use_bias is None else self.use_bias,
            tie_embeddings=gpt2 if self.tie_embeddings is None else self.tie_embeddings,
        )
        out = dataclasses.replace(out, qkv_bias=out.use_bias if self.qkv_bias is None else self.qkv_bias)
        _check_rope_and_window(out)
        if out.n_head % out.n_kv_heads:
            raise ConfigError(f"model.n_head={out.n_head} must be a multiple of model.n_kv_heads={out.n_kv_heads}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "set model.head_dim explicitly"
            )
        unknown = sorted(set(out.lora_targets) - set(LORA_TARGETS))
        if out.lora_rank < 0 or unknown:
            raise ConfigError(
                f"model.lora_rank={out.lora_rank} must be >= 0 and model.lora_targets "
                f"{list(out.lora_targets)} taken from {list(LORA_TARGETS)}"
            )
        if out.attention_block < 0:
            raise ConfigError(f"model.attention_block={out.attention_block} must be >= 0 (0: automatic)")
        if out.position == "rope" and out.head_dim % 2:
            raise ConfigError(f"rotary positions need an even model.head_dim, got {out.head_dim}")
        return out


def _check_rope_and_window(cfg: ModelConfig) -> None:
    negative = [
        f"model.{k}={getattr(cfg, k)}"
        for k in ("sliding_window", "global_every", "attn_softcap", "logit_softcap", "query_pre_attn_scalar")
        if getattr(cfg, k) < 0
    ]
    if negative:
        raise ConfigError(f"{', '.join(negative)} must be >= 0 (0: off)")
    if cfg.rope_scaling == "none":
        return
    if cfg.position != "rope":
        raise ConfigError(f"model.rope_scaling={cfg.rope_scaling!r} needs rotary positions (model.position='rope')")
    if not cfg.rope_factor >= 1.0 or cfg.rope_original_context < 1:
        raise ConfigError(
            f"model.rope_factor={cfg.rope_factor} must be >= 1 and model.rope_original_context="
            f"{cfg.rope_original_context} >= 1"
        )
    if cfg.rope_scaling == "llama3" and not 0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor:
        raise ConfigError(
            f"model.rope_low_freq_factor={cfg.rope_low_freq_factor} and model.rope_high_freq_factor="
            f"{cfg.rope_high_freq_factor} must satisfy 0 < low < high"
        )
    if cfg.rope_scaling == "yarn" and not 0 < cfg.rope_beta_slow < cfg.rope_beta_fast:
        raise ConfigError(
            f"model.rope_beta_slow={cfg.rope_beta_slow} and model.rope_beta_fast={cfg.rope_beta_fast} "
            "must satisfy 0 < slow < fast"
        )


DEFAULT_LOGICAL_AXIS_RULES: tuple = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("position", None),
    ("lora", None),  # the rank of LoRA adapters: small, replicated
    # activations
    ("activation_batch", ["data", "fsdp"]),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


@dataclass
class MeshConfig:
    """Device mesh. One of data/fsdp/tensor may be -1: all remaining devices.

    data, fsdp and tensor lay out the devices *within* a slice (fast ICI links); the dcn_*
    sizes repeat that layout across slices (or, on CPU/GPU, processes) joined by the slower
    data-centre network, so a mesh axis has size ici * dcn. Keep tensor parallelism on ICI.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # (logical axis name, mesh axis | list of mesh axes | None), MaxText style
    rules: tuple = DEFAULT_LOGICAL_AXIS_RULES


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = None  # None: train.max_steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # parameter leaf names that get no weight decay (biases, norm scales, embeddings)
    no_decay: tuple = ("bias", "scale", "embedding")
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclass
class DataConfig:
    # world: the embedded generated corpus; text: one text file sampled in random windows
    # (nanoGPT); jsonl: {"text": ...} documents, packed or padded into rows, shuffled per epoch
    # tfds: a TFDS dataset by name and split (catalog or built by flaxgpt.data.tfds_source)
    # tokens: a directory written by `python -m flaxgpt.data.prepare`, streamed from disk
    source: Literal["text", "world", "jsonl", "tfds", "tokens"] = "world"
    path: str = ""  # the text or JSONL file, or the prepared token directory
    # tokens: several prepared directories sampled by weight, e.g. [{"path": "web", "weight": 0.7},
    # {"path": "code", "weight": 0.3}] (weights are normalised); replaces data.path
    mixture: tuple = ()
    val_path: str = ""  # jsonl: a separate validation file; empty: hold out the last documents
    train_fraction: float = 0.9  # first part trains, the rest validates (nanoGPT split)
    packing: Literal["pack", "pad"] = "pack"  # jsonl: several documents per row, or one per row
    # a malformed JSONL line (or a missing / corrupt token shard) stops the run, or is skipped
    on_error: Literal["raise", "skip"] = "raise"
    tfds_name: str = ""  # e.g. tiny_shakespeare, lm1b, c4/en, flaxgpt_text
    tfds_data_dir: str = ""  # local or gs:// directory holding prepared datasets
    tfds_train_split: str = "train"
    tfds_val_split: str = "validation"  # empty: hold out the last train_fraction of the train split
    tfds_text_key: str = "text"
    prefetch: int = 2  # host batches built ahead in a background thread (0: none)
    tokenizer: Literal["char", "sentencepiece"] = "char"
    spm_model: str = ""  # existing .model file; empty: train one into the workdir
    spm_vocab_size: int = 512
    spm_model_type: Literal["bpe", "unigram"] = "bpe"
    # Curation of JSONL documents (off by default; counts go to WORKDIR/data_report.json)
    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    blocklist: str = ""  # file of terms, one per line; a document containing any is dropped
    dedup: bool = False  # drop exact duplicates (case and whitespace normalised)
    near_dedup: bool = False  # drop near duplicates (MinHash over word 3-grams, LSH)
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity
    # Augmentation of JSONL training documents (EDA; off by default, seeded by train.seed)
    augment_copies: int = 0  # augmented variants added per training document
    augment_ops: tuple = ("synonym", "insert", "delete", "swap")
    augment_rate: float = 0.1  # fraction of words each op touches
    synonyms: str = ""  # JSON {"word": ["synonym", ...]} or lines "word<TAB>syn1,syn2"
    world_seed: int = 0  # embedded world: which world
    world_documents: int = 6000  # embedded world: corpus size in documents (pretraining)
    # share of those documents that are arithmetic drills ("18 plus 2 is 20. 15 minus 3 is 12. ..."):
    # without them each of the world's sums appears only a few times and the model cannot add
    world_arithmetic: float = 0.0
    world_conversations: int = 3000  # embedded world: SFT demonstrations
    # share of demonstrations that are wrong or sloppy, as human demonstrations are: what
    # the reward model and RLHF can later improve on
    world_noise: float = 0.3
    # share of the other demonstrations to age questions that hedge ("About 36."): a habit of the
    # demonstrators that SFT imitates (greedily too) and the labelers rank below a plain answer
    world_hedge: float = 0.0
    world_system: str = "Answer briefly."  # system message of world conversations ("" for none)
    world_rankings: int = 800  # embedded world: prompts whose K sampled answers the labeler ranks
    world_ranking_k: int = 4
    world_ranking_temperature: float = 1.0
    # share of ranked prompts with no exactly correct sampled answer where the labeler writes the
    # correct answer in place of the worst one (InstructGPT's labelers also wrote demonstrations):
    # without it the RM never sees the right answer to a question the policy always gets wrong
    world_ranking_write_correct: float = 0.0
    world_preferences: int = 2000  # embedded world: pairs (DPO, ORPO) or thumbs-up/down records (KTO)


@dataclass
class TrainConfig:
    trainer: Literal["pretrain", "sft", "reward", "ppo", "dpo", "kto", "orpo", "grpo", "online"] = "pretrain"
    # Start from another run's parameters (its workdir, latest or `init_step` checkpoint).
    # The model's structure and tokenizer come from there; a conflicting model field is an error.
    init_from: str = ""
    init_step: int | None = None
    # Start from a Hugging Face model directory (config.json + *.safetensors, GPT-2 or Llama
    # family): its structure and tokenizer, its weights placed shard by shard. Rotary models keep
    # this experiment's model.block_size as their context.
    init_from_hf: str = ""
    batch_size: int = 32  # global batch per optimizer step
    grad_accum_steps: int = 1  # micro-batches per step (batch_size must divide)
    max_steps: int = 1000
    seed: int = 0
    log_interval: int = 10
    z_loss: float = 0.0
    # A step whose loss or gradient is not finite is skipped (parameters untouched);
    # more than this many skipped steps stops the run with an error.
    max_skipped_steps: int = 10
    # compile every program of the run for this process's devices, print per-device memory,
    # FLOPs and a roofline bound (python -m flaxgpt.compile's report), and exit without training
    compile_only: bool = False


@dataclass
class SftConfig:
    loss_on: Literal["all", "last"] = "all"  # every assistant turn, or only the final one
    eval_examples: int = 64  # validation conversations answered by generation (0: none)
    max_new_tokens: int = 32  # for those answers (greedy)


@dataclass
class RewardConfig:
    margin: float = 0.0  # loss -log sigmoid(r_better - r_worse - margin)
    # After training, shift the score head's bias so the reference responses score mean 0
    # (InstructGPT: labeler demonstrations). Reference: reference_path (conversations JSONL,
    # the final assistant turn answering the user turn before it), else the world's
    # demonstrations, else the top-ranked response of every training prompt.
    normalize: bool = True
    reference_path: str = ""


@dataclass
class PPOConfig:
    """RLHF with PPO (InstructGPT step 3). One PPO step = one rollout of train.batch_size prompts,
    then `epochs` passes over it in `minibatches`; train.max_steps counts PPO steps."""

    reward_from: str = ""  # a reward-model run; empty: reward_function
    # "world": the embedded world's labeler; "calculator": checks "What is a plus / minus b?" answers
    # only (0 elsewhere); "module:function": a Python (prompt, response) -> float
    reward_function: str = ""
    # GRPO / RLOO with both: reward = RM score + reward_function_weight * the function's
    reward_function_weight: float = 1.0
    value_model: Literal["separate", "head"] = "separate"  # own model (from the RM), or a head on the policy
    prompts_path: str = ""  # JSONL {"prompt": ..., "system": optional}; empty on the world: world questions
    world_prompts: int = 2000  # world: size of the training prompt pool
    max_new_tokens: int = 32
    temperature: float = 1.0  # rollouts sample here; log-probs use the same scaled logits
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    whiten_rewards: bool = False  # whiten per-token rewards before GAE (advantages are always whitened)
    kl_coef: float = 0.15  # beta; the initial value when adaptive
    adaptive_kl: bool = True  # Ziegler et al.: steer KL(policy || reference) towards kl_target
    kl_target: float = 6.0  # PPO steers towards it; GRPO / RLOO report it beside the held-out KL (val_kl)
    kl_horizon: float = 10000.0
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ends
    # PPO-ptx: + ptx_coef * pretraining loss on the data section's corpus (InstructGPT: 27.8)
    ptx_coef: float = 0.0
    ptx_batch_size: int = 8
    # Iterated RLHF: split train.max_steps into `rounds`; each new round samples comparisons from
    # the current policy, ranks them with the labeler, retrains the RM, then continues PPO
    rounds: int = 1
    round_rm_steps: int = 60
    eval_prompts: int = 128  # held-out prompts answered at each evaluation (0: none)


@dataclass
class DPOConfig:
    """Direct preference optimisation on `pairs` or `rankings` (expanded to pairs)."""

    beta: float = 0.1  # strength of the pull towards the reference (the SFT start)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO, or IPO (per-token mean log-ratios)
    label_smoothing: float = 0.0  # conservative DPO: the share of labels assumed flipped, in [0, 0.5)


@dataclass
class KTOConfig:
    """KTO on thumbs-up/down `feedback` records (unpaired)."""

    beta: float = 0.1
    desirable_weight: float = 1.0  # raise one of them when the labels are imbalanced
    undesirable_weight: float = 1.0


@dataclass
class ORPOConfig:
    """ORPO on `pairs`: SFT on the chosen answer plus the odds-ratio term, no reference model."""

    beta: float = 0.1  # weight of the odds-ratio term (the paper's lambda)


@dataclass
class GRPOConfig:
    """GRPO / RLOO: group-relative advantages, no value model. Prompts, reward, max_new_tokens and
    temperature come from the ppo section; train.batch_size counts prompts per step."""

    group_size: int = 4  # answers sampled per prompt (G)
    advantage: Literal["grpo", "rloo"] = "grpo"  # group mean (and std) baseline, or leave-one-out
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    normalization: Literal["sequence", "token", "constant"] = "sequence"  # GRPO, DAPO, Dr. GRPO
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher: 0.28
    beta: float = 0.04  # weight of the k3 KL to the reference in the loss
    dynamic_sampling: bool = False  # DAPO: groups whose answers all score the same do not train
    epochs: int = 1  # updates per rollout


@dataclass
class OnlineConfig:
    """The online learner (trainer "online"): updates from the served model's feedback database.
    Thumbs become KTO records (kto.*), up-vs-down and regenerated answers DPO pairs (dpo.*), both
    anchored to the promoted model; optimizer.* and train.batch_size shape each update."""

    db: str = ""  # the feedback database ("": WORKDIR/feedback.sqlite, where the server keeps it)
    min_events: int = 32  # new ratings needed before an update
    steps_per_update: int = 20  # an update reads the ratings that fill about this many batches (one pass over them)
    max_updates: int = 0  # updates before the learner exits (0: until stopped)
    poll_seconds: float = 5.0  # wait between looks at the database
    guard_questions: int = 64  # world: held-out questions whose greedy accuracy guards promotion
    max_regression: float = 0.05  # a candidate scoring more than this below the promoted model is kept, not promoted
    max_loss_rise: float = 0.2  # ... or whose loss on held-out thumbs-up answers is this much (relative) higher
    replay: int = 0  # questions of earlier updates rehearsed in each update, with their best-supported answers
    restart_after: int = (
        0  # the learner continues its newest candidate; after this many rejected in a row, the promoted one (0: never)
    )
    sft_weight: float = 1.0  # weight of the thumbs-up (and corrected) answers' log-likelihood beside KTO
    keep: int = 8  # checkpoints kept besides the promoted ones (all of which are kept)


INSTRUCTGPT_PTX_COEF = 27.8  # InstructGPT's PPO-ptx coefficient (their "gamma")


@dataclass
class EvalConfig:
    interval: int = 250
    iters: int = 20
    batch_size: int = 0  # 0: train.batch_size
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    sample_seed: int = 0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 500
    max_to_keep: int = 3
    async_save: bool = True
    # a LoRA run from train.init_from / init_from_hf saves its adapters, their optimizer state and
    # a record of the base (source, fingerprint); false: the whole tree (stands alone without the base)
    adapters_only: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flaxgpt"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    report: bool = True  # plots and report.html in WORKDIR/report at the end of each run (and pipeline)


@dataclass
class Config:
    name: str = "unnamed"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        """Types, then every numeric field against RANGES, then cross-field checks; raises
        ConfigError naming the keys involved. Runs before any work starts."""
        _check_types(self, "")
        check_ranges(self, "")
        self.model.resolved()
        t = self.train
        if t.batch_size % t.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum_steps={t.grad_accum_steps}"
            )
        _check_cross_fields(self)
        _check_data(self.data)
        if t.trainer in ("sft", "reward") and self.data.source not in ("world", "jsonl", "tokens"):
            raise ConfigError(
                f"train.trainer='{t.trainer}' reads data.source 'world' or 'jsonl' or 'tokens', "
                f"got '{self.data.source}'"
            )
        if t.trainer == "reward" and self.data.source == "world" and not t.init_from:
            raise ConfigError(
                "train.trainer='reward' on the world samples its comparisons from a policy: set "
                "train.init_from to the SFT run's workdir"
            )
        if t.init_from and t.init_from_hf:
            raise ConfigError(
                "set one of train.init_from (a flaxgpt run) and train.init_from_hf (a Hugging Face "
                "model directory), not both"
            )
        if t.init_from_hf and t.trainer not in ("pretrain", "sft"):
            raise ConfigError(
                f"train.init_from_hf starts pretraining or SFT; train.trainer='{t.trainer}' starts "
                "from a flaxgpt run (python -m flaxgpt.convert import makes one)"
            )
        if t.trainer in ("ppo", "grpo"):
            _check_ppo(self)
        if t.trainer in ("dpo", "kto", "orpo", "online"):
            sources = ("world", "jsonl") + (("tokens",) if t.trainer != "online" else ())
            if self.data.source not in sources:
                raise ConfigError(
                    f"train.trainer='{t.trainer}' reads data.source {' or '.join(map(repr, sources))}, "
                    f"got '{self.data.source}'"
                )
            if not t.init_from:
                raise ConfigError(
                    f"train.trainer='{t.trainer}' starts from a policy: set train.init_from to the SFT run"
                )
        return self


# ----------------------------------------------------------------------------- valid ranges

INT_MAX = 2**31 - 1  # integers stay within int32, which JAX counts steps and seeds in

# The valid values of every numeric field, checked by `Config.validate()` before any work starts
# and stated in the error: "> 0", ">= 1" (integers: up to INT_MAX), "[0, 1)" or "(0, 1]"
# (intervals), "any" (any finite number), "... or -1" (one special value). Floats are always finite.
# Optional fields (None) are checked only when set. tests/test_config.py checks that every numeric
# field has an entry.
RANGES: dict[str, str] = {
    # model
    "model.vocab_size": ">= 0",
    "model.vocab_multiple": ">= 1",
    "model.valid_vocab": ">= 0",
    "model.block_size": ">= 1",
    "model.n_layer": ">= 1",
    "model.n_head": ">= 1",
    "model.n_kv_heads": ">= 1",
    "model.d_model": ">= 1",
    "model.head_dim": ">= 1",
    "model.d_ff": ">= 1",
    "model.norm_eps": "> 0",
    "model.rope_theta": "> 0",
    "model.dropout": "[0, 1)",
    "model.init_std": "> 0",
    "model.attention_block": ">= 0",
    "model.rope_factor": ">= 1",
    "model.rope_low_freq_factor": "> 0",
    "model.rope_high_freq_factor": "> 0",
    "model.rope_original_context": ">= 1",
    "model.rope_beta_fast": "> 0",
    "model.rope_beta_slow": "> 0",
    "model.rope_attention_factor": ">= 0",
    "model.sliding_window": ">= 0",
    "model.global_every": ">= 0",
    "model.attn_softcap": ">= 0",
    "model.logit_softcap": ">= 0",
    "model.query_pre_attn_scalar": ">= 0",
    "model.lora_rank": ">= 0",
    "model.lora_alpha": "> 0",
    "model.lora_dropout": "[0, 1)",
    # mesh
    "mesh.data": ">= 1 or -1",
    "mesh.fsdp": ">= 1 or -1",
    "mesh.tensor": ">= 1 or -1",
    "mesh.dcn_data": ">= 1",
    "mesh.dcn_fsdp": ">= 1",
    "mesh.dcn_tensor": ">= 1",
    # optimizer
    "optimizer.lr": "> 0",
    "optimizer.min_lr": ">= 0",
    "optimizer.warmup_steps": ">= 0",
    "optimizer.decay_steps": ">= 1",
    "optimizer.b1": "[0, 1)",
    "optimizer.b2": "[0, 1)",
    "optimizer.eps": "> 0",
    "optimizer.weight_decay": ">= 0",
    "optimizer.grad_clip": ">= 0",
    # data
    "data.train_fraction": "(0, 1)",
    "data.prefetch": ">= 0",
    "data.spm_vocab_size": "> 256",  # byte fallback alone takes 256 pieces
    "data.min_chars": ">= 0",
    "data.max_chars": ">= 0",
    "data.near_dedup_threshold": "(0, 1]",
    "data.augment_copies": ">= 0",
    "data.augment_rate": "[0, 1]",
    "data.world_seed": ">= 0",
    "data.world_documents": ">= 1",
    "data.world_arithmetic": "[0, 1]",
    "data.world_conversations": ">= 1",
    "data.world_noise": "[0, 1]",
    "data.world_hedge": "[0, 1]",
    "data.world_rankings": ">= 1",
    "data.world_ranking_k": ">= 2",
    "data.world_ranking_temperature": "> 0",
    "data.world_ranking_write_correct": "[0, 1]",
    "data.world_preferences": ">= 1",
    # train
    "train.init_step": ">= 0",
    "train.batch_size": ">= 1",
    "train.grad_accum_steps": ">= 1",
    "train.max_steps": ">= 1",
    "train.seed": ">= 0",
    "train.log_interval": ">= 1",
    "train.z_loss": ">= 0",
    "train.max_skipped_steps": ">= 0",
    # sft, reward
    "sft.eval_examples": ">= 0",
    "sft.max_new_tokens": ">= 1",
    "reward.margin": ">= 0",
    # ppo
    "ppo.world_prompts": ">= 1",
    "ppo.reward_function_weight": "> 0",
    "ppo.max_new_tokens": ">= 1",
    "ppo.temperature": "> 0",  # rollouts sample
    "ppo.epochs": ">= 1",
    "ppo.minibatches": ">= 1",
    "ppo.gamma": "[0, 1]",
    "ppo.lam": "[0, 1]",
    "ppo.clip": "> 0",
    "ppo.value_clip": "> 0",
    "ppo.value_coef": ">= 0",
    "ppo.entropy_coef": ">= 0",
    "ppo.kl_coef": ">= 0",
    "ppo.kl_target": "> 0",
    "ppo.kl_horizon": "> 0",
    "ppo.missing_eos_penalty": ">= 0",
    "ppo.ptx_coef": ">= 0",
    "ppo.ptx_batch_size": ">= 1",
    "ppo.rounds": ">= 1",
    "ppo.round_rm_steps": ">= 1",
    "ppo.eval_prompts": ">= 0",
    "dpo.beta": "> 0",
    "dpo.label_smoothing": "[0, 0.5)",
    "kto.beta": "> 0",
    "kto.desirable_weight": "> 0",
    "kto.undesirable_weight": "> 0",
    "orpo.beta": "> 0",
    "grpo.group_size": ">= 2",
    "grpo.clip_low": "(0, 1)",
    "grpo.clip_high": "> 0",
    "grpo.beta": ">= 0",
    "grpo.epochs": ">= 1",
    "online.min_events": ">= 1",
    "online.steps_per_update": ">= 1",
    "online.max_updates": ">= 0",
    "online.poll_seconds": "> 0",
    "online.guard_questions": ">= 1",
    "online.max_regression": ">= 0",
    "online.max_loss_rise": "> 0",
    "online.sft_weight": ">= 0",
    "online.replay": ">= 0",
    "online.restart_after": ">= 0",
    "online.keep": ">= 1",
    # eval
    "eval.interval": ">= 1",
    "eval.iters": ">= 0",
    "eval.batch_size": ">= 0",
    "eval.sample_tokens": ">= 0",
    "eval.temperature": ">= 0",
    "eval.top_k": ">= 0",
    "eval.sample_seed": ">= 0",
    # checkpoint
    "checkpoint.every_steps": ">= 1",
    "checkpoint.max_to_keep": ">= 1",  # 0 would delete the checkpoint just written
}


@dataclass(frozen=True)
class Range:
    """A set of valid numbers, read from a RANGES entry; `value in r` and `str(r)` ("a finite
    number > 0", "an integer in [1, 2147483647]") are what checks and messages use."""

    kind: type  # int or float
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = True
    hi_open: bool = True
    special: tuple = ()  # valid outside the interval, e.g. -1: all remaining devices

    @classmethod
    def parse(cls, spec: str, kind: type) -> Range:
        interval, *special = (part.strip() for part in spec.split(" or "))
        lo, hi, lo_open, hi_open = -math.inf, math.inf, True, True
        if interval[0] in "[(":
            lo, hi = (float(x) for x in interval[1:-1].split(","))
            lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
        elif interval != "any":
            op, number = interval.split()
            lo, lo_open = float(number), op == ">"
        if kind is int and hi > INT_MAX:
            hi, hi_open = INT_MAX, False
        return cls(kind, lo, hi, lo_open, hi_open, tuple(kind(s) for s in special))

    def __contains__(self, value: float) -> bool:
        if value in self.special:
            return True
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        show = (lambda x: str(int(x))) if self.kind is int else _show_float
        if math.isfinite(self.lo) and math.isfinite(self.hi):
            what = "an integer" if self.kind is int else "a number"
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"{what} in {left}{show(self.lo)}, {show(self.hi)}{right}"
        elif math.isfinite(self.lo):
            text = f"a finite number {'>' if self.lo_open else '>='} {show(self.lo)}"
        else:
            text = "a finite number"
        return " or ".join([*(show(s) for s in self.special), text])


def _show_float(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


def show_value(value: Any) -> str:
    """A value as an error message shows it (huge integers in short scientific form)."""
    return f"{value:.3g}" if isinstance(value, int) and abs(value) > 10**12 else repr(value)


def field_range(key: str, kind: type) -> Range:
    return Range.parse(RANGES[key], kind)


def check_ranges(node: Any, prefix: str) -> None:
    """Every numeric field of a section tree against RANGES; ConfigError names the first offender."""
    for key, ftype, value in _leaves(node, prefix):
        kind = _numeric_kind(ftype)
        if kind and value is not None and value not in field_range(key, kind):
            raise ConfigError(f"{key}={show_value(value)}: expected {field_range(key, kind)}")


def describe_keys(cfg: Config, prefix: str = "") -> list[str]:
    """One line per key: its value and, for a number, its valid range (`train --list-keys`)."""
    lines = []
    for key, ftype, value in _leaves(cfg, ""):
        kind = _numeric_kind(ftype)
        choices = [typing.get_args(a) for a in (ftype, *typing.get_args(ftype)) if typing.get_origin(a) is Literal]
        expected = field_range(key, kind) if kind else (f"one of {list(choices[0])}" if choices else "")
        lines.append(f"{prefix}{key}={json.dumps(value)}" + (f"  # {expected}" if expected else ""))
    return lines


def _leaves(node: Any, prefix: str):
    """(key, declared type, value) of every value field of a section tree."""
    for name, ftype in typing.get_type_hints(type(node)).items():
        if dataclasses.is_dataclass(ftype):
            yield from _leaves(getattr(node, name), f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ftype, getattr(node, name)


def _numeric_kind(ftype: Any) -> type | None:
    """int or float for a numeric (or Optional numeric) field type, else None."""
    inner = [a for a in typing.get_args(ftype) if a is not type(None)] or [ftype]
    return inner[0] if inner[0] in (int, float) and len(inner) == 1 else None


def _check_data(data: DataConfig) -> None:
    """The data source has what it reads (a path, a TFDS name, a well-formed mixture)."""
    if data.source == "tfds" and not data.tfds_name:
        raise ConfigError("data.source='tfds' needs data.tfds_name")
    if data.source == "tokens" and not (data.path or data.mixture):
        raise ConfigError("data.source='tokens' needs data.path or data.mixture (prepared token directories)")
    for i, m in enumerate(data.mixture):
        ok = isinstance(m, dict) and set(m) == {"path", "weight"} and isinstance(m["path"], str) and m["path"]
        if not ok or isinstance(m["weight"], bool) or not isinstance(m["weight"], (int, float)) or m["weight"] <= 0:
            raise ConfigError(f'data.mixture[{i}] must be {{"path": DIR, "weight": W > 0}}, got {m!r}')
    if data.mixture and data.source != "tokens":
        raise ConfigError(f"data.mixture needs data.source='tokens', got '{data.source}'")
    if data.source in ("text", "jsonl") and not data.path:
        raise ConfigError(f"data.source='{data.source}' needs data.path (a {data.source} file)")


def _check_ppo(cfg: Config) -> None:
    """PPO and GRPO start from a policy, have one reward source and split their rollouts evenly."""
    t, p = cfg.train, cfg.ppo
    if not t.init_from:
        raise ConfigError(f"train.trainer='{t.trainer}' starts from a policy: set train.init_from to the SFT run")
    if not (p.reward_from or p.reward_function) or (p.reward_from and p.reward_function and t.trainer != "grpo"):
        both = " (GRPO / RLOO also take both: the sum)" if t.trainer != "grpo" else " or both (the sum)"
        raise ConfigError(
            f"train.trainer='{t.trainer}' needs one of ppo.reward_from (a reward-model run) "
            f"and ppo.reward_function ('world', 'calculator' or 'module:function'){both}"
        )
    if p.reward_function_weight != 1.0 and not (p.reward_from and p.reward_function):
        where = "GRPO / RLOO only: " if t.trainer != "grpo" else ""
        raise ConfigError(
            f"ppo.reward_function_weight weighs the function beside ppo.reward_from ({where}set both or neither)"
        )
    if t.trainer == "grpo":
        unread = [k for k in _PPO_ONLY if getattr(p, k) != getattr(PPOConfig(), k)]
        if unread:
            raise ConfigError(
                f"ppo.{unread[0]} is PPO's: train.trainer='grpo' does not read it (GRPO / RLOO take the "
                "prompts, reward, lengths and temperature from ppo, their own settings from grpo)"
            )
        return _check_prompts(cfg)
    if t.batch_size % p.minibatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (prompts per rollout) must be a multiple of "
            f"ppo.minibatches={p.minibatches}"
        )
    if t.max_steps % p.rounds:
        raise ConfigError(f"train.max_steps={t.max_steps} must be a multiple of ppo.rounds={p.rounds}")
    if p.rounds > 1 and (cfg.data.source != "world" or not p.reward_from):
        raise ConfigError(
            "ppo.rounds > 1 retrains the reward model on new comparisons ranked by the world's "
            "labeler: it needs data.source='world' and ppo.reward_from"
        )
    _check_prompts(cfg)


def _check_prompts(cfg: Config) -> None:
    if not cfg.ppo.prompts_path and cfg.data.source != "world":
        raise ConfigError(
            f"train.trainer='{cfg.train.trainer}' needs ppo.prompts_path (JSONL prompts) unless data.source='world'"
        )


# the ppo section's settings only PPO reads (a GRPO / RLOO run setting one would silently ignore it)
_PPO_ONLY = (
    "value_model",
    "epochs",
    "minibatches",
    "gamma",
    "lam",
    "clip",
    "value_clip",
    "value_coef",
    "entropy_coef",
    "whiten_rewards",
    "kl_coef",
    "adaptive_kl",
    "kl_horizon",
    "ptx_coef",
    "ptx_batch_size",
    "rounds",
    "round_rm_steps",
)


def _check_cross_fields(cfg: Config) -> None:
    """Checks between fields that would otherwise fail late, or silently."""
    m, d, o = cfg.model, cfg.data, cfg.optimizer
    if m.vocab_size and m.valid_vocab > m.vocab_size:
        raise ConfigError(f"model.valid_vocab={m.valid_vocab} exceeds model.vocab_size={m.vocab_size}")
    axes = {"mesh.data": cfg.mesh.data, "mesh.fsdp": cfg.mesh.fsdp, "mesh.tensor": cfg.mesh.tensor}
    if list(axes.values()).count(-1) > 1:
        raise ConfigError(f"at most one of {', '.join(f'{k}={v}' for k, v in axes.items())} may be -1")
    if d.max_chars and d.max_chars < d.min_chars:
        raise ConfigError(f"data.max_chars={d.max_chars} is below data.min_chars={d.min_chars} (0: no limit)")
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} exceeds optimizer.lr={o.lr}")
    for key, new_tokens, generates in (  # answers generated after a prompt, within the context
        ("sft.max_new_tokens", cfg.sft.max_new_tokens, cfg.train.trainer == "sft" and cfg.sft.eval_examples > 0),
        ("ppo.max_new_tokens", cfg.ppo.max_new_tokens, cfg.train.trainer == "ppo"),
    ):
        if generates and new_tokens >= m.block_size:
            raise ConfigError(f"{key}={new_tokens} leaves no room for a prompt in model.block_size={m.block_size}")


# ----------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_dict(data: dict, cls: type = Config, prefix: str = "") -> Any:
    """Inverse of `to_dict`, strict: unknown keys are errors with suggestions."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key_message(path, [f"{prefix}{k}" for k in hints]))
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a section (a dict), got {value!r}")
            kwargs[key] = from_dict(value, ftype, f"{path}.")
        else:
            kwargs[key] = _coerce(value, ftype, path)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
    """Apply `section.key=value` strings in place and return cfg.

    Values are parsed by the field's type: numbers, true/false, none (for
    Optional fields), strings as typed, and JSON for tuples or lists.
    """
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} is not of the form key=value")
        path, raw = assignment.split("=", 1)
        path = path.strip()
        parts = path.split(".")
        node = cfg
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(type(node))
            if part not in hints:
                here = ".".join(parts[:depth])
                candidates = all_keys(cfg) if depth == 0 else [f"{here}.{k}" if here else k for k in all_keys(node)]
                candidates += [f.name for f in dataclasses.fields(cfg)]
                raise ConfigError(_unknown_key_message(path, candidates))
            if depth == len(parts) - 1:
                ftype = hints[part]
                if dataclasses.is_dataclass(ftype):
                    raise ConfigError(
                        f"{path} is a section, not a value; set one of its keys, e.g. "
                        f"{path}.{dataclasses.fields(ftype)[0].name}=..."
                    )
                setattr(node, part, _parse(raw, ftype, path))
            else:
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    raise ConfigError(f"{'.'.join(parts[: depth + 1])} is a value, not a section")
    return cfg


# Spellings that users of nanoGPT, MaxText and Hugging Face reach for first.
_ALIASES = {
    "learning_rate": "lr",
    "max_lr": "lr",
    "n_embd": "d_model",
    "emb_dim": "d_model",
    "hidden_size": "d_model",
    "num_layers": "n_layer",
    "num_decoder_layers": "n_layer",
    "num_heads": "n_head",
    "n_heads": "n_head",
    "num_kv_heads": "n_kv_heads",
    "num_key_value_heads": "n_kv_heads",
    "max_iters": "max_steps",
    "warmup_iters": "warmup_steps",
    "lr_decay_iters": "decay_steps",
    "beta1": "b1",
    "beta2": "b2",
    "max_seq_len": "block_size",
    "max_target_length": "block_size",
    "seq_len": "block_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "eval_interval": "interval",
    "eval_iters": "iters",
}


def _unknown_key_message(path: str, candidates: list[str]) -> str:
    section, _, leaf = path.rpartition(".")
    alias = _ALIASES.get(leaf)
    aliased = [
        c
        for c in candidates
        if alias and c.rpartition(".")[2] == alias and (not section or c.startswith(section + "."))
    ]
    close = aliased[:1] or difflib.get_close_matches(path, candidates, n=1, cutoff=0.5)
    if not close:  # compare the last component only, e.g. "optimizer.learning_rate" vs "lr"
        leaf = path.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{path}'{hint}"


def _parse(raw: str, ftype: Any, path: str) -> Any:
    """Parse a command-line string into `ftype`."""
    text = raw.strip()
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null"):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse(raw, inner[0], path)
    if ftype is str:
        return raw
    if origin is Literal:
        return _coerce(raw, ftype, path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if ftype is float and _is_float(text):  # nan, inf: parsed, then refused by the range check
            value = float(text)
        elif ftype is tuple and "," in text:
            value = [v.strip() for v in text.split(",")]
        else:
            value = text
    return _coerce(value, ftype, path)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _coerce(value: Any, ftype: Any, path: str) -> Any:
    """Check (and gently convert) a value against a field type."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}{hint}")
        return value
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path} must be a bool (true/false), got {value!r}")
    if ftype is int:
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return int(value)
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if ftype is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if ftype is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(tuple(v) if isinstance(v, list) and path.endswith("rules") else v for v in value)
        raise ConfigError(f'{path} must be a list (JSON, e.g. ["a", "b"]), got {value!r}')
    return value


def _check_types(node: Any, prefix: str) -> None:
    """Catch wrongly typed values written directly in an experiment file."""
    for name, ftype in typing.get_type_hints(type(node)).items():
        value = getattr(node, name)
        if dataclasses.is_dataclass(ftype):
            _check_types(value, f"{prefix}{name}.")
        else:
            _coerce(value, ftype, f"{prefix}{name}")
