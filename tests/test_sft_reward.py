"""SFT and the reward model: loss masking, the ranking loss, reward placement, short real runs."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, init_params, tiny_model_config, tiny_run_config

from flaxgpt import rewards
from flaxgpt.chat_template import render
from flaxgpt.checkpoint import CheckpointMismatch
from flaxgpt.data import world as world_lib
from flaxgpt.data.jsonl import DataError
from flaxgpt.data.tokenizers import CharTokenizer
from flaxgpt.logging import read_metrics
from flaxgpt.losses import ranking_loss, token_cross_entropy
from flaxgpt.model import Transformer
from flaxgpt.trainers import pretrain, reward, sft

SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A tiny world model (block 96) that SFT can start from."""
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    pretrain.run(
        tiny_run_config(model={"block_size": 96}, train={"max_steps": 40}, eval={"interval": 40, "sample_tokens": 0}),
        workdir,
    )
    return workdir


def sft_config(init_from: str, **sections):
    cfg = tiny_run_config(
        train={"trainer": "sft", "init_from": init_from, "max_steps": 60, "log_interval": 1},
        data={"world_conversations": 400, "world_system": SYSTEM},
        sft={"eval_examples": 16, "max_new_tokens": 16},
        eval={"interval": 60, "iters": 2, "sample_tokens": 0},
        optimizer={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "weight_decay": 0.0},
    )
    cfg.model.block_size = 96
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


# ----------------------------------------------------------------------------- SFT


def test_assistant_mask_and_last_turn_only():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?.0123456789")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi?"},
        {"role": "assistant", "content": "yo."},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "ok"},
    ]
    inputs, targets, weights = sft.conversation_example(messages, tok, 64, "all")
    assert len(inputs) == len(targets) == len(weights)
    learned = "".join(tok.decode([t]) for t, w in zip(targets, weights) if w)
    assert learned == "yo.<|end|>ok<|end|>"  # assistant content and its end marker, nothing else
    _, targets, weights = sft.conversation_example(messages, tok, 64, "last")
    assert "".join(tok.decode([t]) for t, w in zip(targets, weights) if w) == "ok<|end|>"


def test_prompt_tokens_carry_no_gradient():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?.")
    messages = [{"role": "user", "content": "what is up?"}, {"role": "assistant", "content": "the sky."}]
    inputs, targets, weights = (np.asarray(a)[None] for a in sft.conversation_example(messages, tok, 40))
    cfg = tiny_model_config(vocab_size=tok.vocab_size, block_size=inputs.shape[1])
    model, params = init_params(cfg)
    weights = jnp.asarray(weights, jnp.float32)

    def loss(logits, targets):
        return token_cross_entropy(logits, targets, weights)["loss_sum"]

    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(inputs))
    grad = jax.jit(jax.grad(loss))(logits, jnp.asarray(targets))
    prompt = np.asarray(weights[0]) == 0
    assert prompt.sum() > 5 and (~prompt).sum() > 5
    assert np.all(np.asarray(grad)[0, prompt] == 0.0)
    assert np.all(np.abs(np.asarray(grad)[0, ~prompt]).sum(-1) > 0)
    # whatever the prompt positions' targets are, neither the loss nor the parameter gradient changes
    scrambled = np.where(prompt[None], np.random.default_rng(0).integers(0, tok.vocab_size, targets.shape), targets)
    param_loss = jax.jit(lambda p, t: loss(model.apply({"params": p}, jnp.asarray(inputs)), t))
    g1, g2 = (jax.jit(jax.grad(param_loss))(params, jnp.asarray(t)) for t in (targets, scrambled))
    assert float(param_loss(params, jnp.asarray(targets))) == float(param_loss(params, jnp.asarray(scrambled)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), g1, g2)


def test_world_demonstrations_are_imperfect_and_labeled():
    world = world_lib.make_world(0)
    rng = random.Random(0)
    questions = [world_lib.random_question(world, rng)[0] for _ in range(2000)]
    demos = [world_lib.demonstration(world, q, rng, 0.3) for q in questions]
    labels = [world_lib.label(world, q, d) for q, d in zip(questions, demos)]
    assert 0.65 < np.mean([s == 1.0 for s in labels]) < 0.75  # 70 % clean
    assert 0.11 < np.mean([s == 0.5 for s in labels]) < 0.19  # 15 % sloppy
    assert 0.11 < np.mean([s == 0.2 for s in labels]) < 0.19  # 15 % wrong (but of the right kind)
    for q in questions[:300]:
        truth = world_lib.answer(world, q)
        assert world_lib.wrong_answer(world, q, rng) != truth
        assert world_lib.label(world, q, truth) == 1.0 and world_lib.label(world, q, f"Maybe {truth}.") == 0.5
    assert world_lib.label(world, "What is 10 plus 7?", "170") == 0.2
    assert world_lib.label(world, "What is 10 plus 7?", "seventeen") == 0.0
    # every character of the chat data is known to the pretraining tokenizer
    tok = CharTokenizer.from_text(world_lib.corpus(world, 6000))
    text = "".join(
        m["content"] for _ in range(300) for m in world_lib.conversation(world, rng, 0.5, SYSTEM)["messages"]
    )
    assert tok.unk_id not in tok.encode(text)


def test_the_calculator_checks_sums_only_and_adds_to_the_rm_by_its_weight(monkeypatch):
    from types import SimpleNamespace

    from flaxgpt import rlhf

    calc = rewards.calculator
    assert calc("What is 13 plus 17?", " 30.") == 1.0 and calc("What is 13 minus 7?", "6") == 1.0
    assert calc("What is 13 plus 17?", "31") == 0.0 and calc("What is 13 plus 17?", "It is 30") == 0.0
    assert calc("How old is Bo?", "30") == 0.0  # no world facts: no preference
    world = world_lib.make_world(0)
    questions = [world_lib.random_question(world, random.Random(1))[0] for _ in range(200)]
    assert all(calc(q, world_lib.answer(world, q)) == world_lib.is_arithmetic(q) for q in questions)
    monkeypatch.setattr(rlhf, "score_sequences", lambda *args: np.array([1.0, -2.0], np.float32))
    monkeypatch.setattr(rlhf, "sequences", lambda *args: (None, np.ones((2, 6), bool), np.array([2, 3]), None))
    monkeypatch.setattr(rlhf, "function_scores", lambda *args: np.array([1.0, 0.0], np.float32))
    ppo = SimpleNamespace(reward_function_weight=2.5)
    run = SimpleNamespace(
        models=SimpleNamespace(reward="rm", query_width=4), reward_fn=calc, cfg=SimpleNamespace(ppo=ppo)
    )
    state = SimpleNamespace(frozen={"reward": None})
    np.testing.assert_allclose(rlhf.scores(run, state, [], None, None, None), [3.5, -2.0])
    run.reward_fn = None
    np.testing.assert_allclose(rlhf.scores(run, state, [], None, None, None), [1.0, -2.0])


def test_sft_from_pretrained_lowers_the_assistant_loss(pretrained, tmp_path):
    result = sft.run(sft_config(pretrained), str(tmp_path))
    rows = read_metrics(str(tmp_path))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    for key in ("val_loss", "val_ppl", "val_exact_match", "val_bleu", "val_rougeL", "val_task_accuracy"):
        assert key in result and math.isfinite(result[key])
    answered = sft_config(pretrained).sft.eval_examples  # accuracy is a count of correct answers out of these
    assert abs(result["val_task_accuracy"] * answered - round(result["val_task_accuracy"] * answered)) < 1e-9
    assert result["val_exact_match"] <= result["val_task_accuracy"]  # exactly the reference is always correct

    # the SFT run uses the pretrained run's tokenizer
    with open(os.path.join(pretrained, "tokenizer.json")) as a, open(tmp_path / "tokenizer.json") as b:
        assert json.load(a) == json.load(b)


def test_text_metrics_on_known_answers():
    from flaxgpt.metrics import text_metrics

    same = text_metrics(["Paris", "the cat sat"], ["Paris", "the cat sat"])
    assert same == {"exact_match": 1.0, "bleu": pytest.approx(100.0), "rouge1": 1.0, "rougeL": 1.0}
    none = text_metrics(["red"], ["Vouron"])
    assert none["exact_match"] == 0.0 and none["bleu"] == 0.0 and none["rouge1"] == 0.0
    part = text_metrics(["the cat"], ["the cat sat"])  # ROUGE-1: precision 1, recall 2/3
    assert part["exact_match"] == 0.0 and part["rouge1"] == pytest.approx(0.8) and part["rougeL"] == pytest.approx(0.8)
    assert 0.0 < part["bleu"] < 100.0


def test_init_from_a_different_shape_is_a_clear_error(pretrained, tmp_path):
    cfg = sft_config(pretrained)
    cfg.model.d_model = 64
    with pytest.raises(CheckpointMismatch, match=r"model.d_model: .* has 32, this experiment sets 64"):
        sft.run(cfg, str(tmp_path))


def test_sft_on_jsonl_conversations_from_scratch(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for _ in range(120):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{a}+{b}"},
                            {"role": "assistant", "content": str(a + b)},
                        ]
                    }
                )
                + "\n"
            )
    cfg = tiny_run_config(
        train={"trainer": "sft", "max_steps": 20},
        data={"source": "jsonl", "path": str(path), "packing": "pad"},
        sft={"eval_examples": 8, "max_new_tokens": 4, "loss_on": "last"},
        eval={"interval": 20, "iters": 1, "sample_tokens": 0},
    )
    result = sft.run(cfg, str(tmp_path / "run"))
    assert "val_exact_match" in result and "val_task_accuracy" not in result  # no labeler for user data


# ----------------------------------------------------------------------------- reward model


def test_ranking_loss_matches_a_hand_computed_value_for_k4():
    rewards = np.array([[1.5, 0.2, -0.3, 0.9], [0.1, -0.4, 2.0, 0.0]], np.float32)
    ranks = np.array([[0, 1, 2, 3], [0, 1, 1, 2]], np.float32)  # second prompt: a tie, and K=3
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
    margin = 0.25
    per_prompt, correct, pairs = [], 0, 0
    for b in range(2):
        losses = []
        for i, j in itertools.permutations(range(4), 2):
            if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
                d = rewards[b, i] - rewards[b, j]
                losses.append(math.log1p(math.exp(-(d - margin))))
                correct, pairs = correct + (d > 0), pairs + 1
        per_prompt.append(sum(losses) / len(losses))
    assert pairs == 6 + 2  # all C(4,2) pairs of the first prompt; the tie gives none in the second
    out = ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(valid), margin)
    assert float(out["weight_sum"]) == 2.0
    np.testing.assert_allclose(float(out["loss_sum"]) / 2, np.mean(per_prompt), rtol=1e-6)
    num, den = out["ratios"]["accuracy"]
    assert (float(num), float(den)) == (correct, pairs)


def test_reward_is_read_at_the_last_real_token_under_padding():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?.")
    cfg = tiny_model_config(vocab_size=tok.vocab_size, block_size=48, output="scalar")
    model, params = init_params(cfg)
    prompt = [{"role": "user", "content": "who?"}]
    responses = ["a", "a longer answer.", "mid size"]
    got = rewards.score(model, params, tok, [(prompt, r) for r in responses], batch_size=4)
    apply = jax.jit(model.apply)
    for response, value in zip(responses, got):
        ids = render(prompt + [{"role": "assistant", "content": response}], tok, 48, add_generation_prompt=False).ids
        alone = apply({"params": params}, jnp.asarray([ids]))[0, -1]  # no padding at all
        np.testing.assert_allclose(value, float(alone), rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) == 3


def _preference_pairs(path, n, seed):
    """Pairs whose chosen answer is made of vowels and rejected one of consonants."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            word = lambda letters: "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
            f.write(
                json.dumps({"prompt": "say " + word("xyz"), "chosen": word("aeiou"), "rejected": word("bcdfg")}) + "\n"
            )


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> tuple[str, dict]:
    base = tmp_path_factory.mktemp("rm")
    _preference_pairs(base / "train.jsonl", 200, 0)
    _preference_pairs(base / "val.jsonl", 48, 1)
    cfg = tiny_run_config(
        train={"trainer": "reward", "max_steps": 40, "batch_size": 8},
        data={"source": "jsonl", "path": str(base / "train.jsonl"), "val_path": str(base / "val.jsonl")},
        eval={"interval": 40, "iters": 6, "sample_tokens": 0},
    )
    workdir = str(base / "run")
    return workdir, reward.run(cfg, workdir)


def test_world_comparisons_sample_with_prompts_padded_to_their_length_not_the_context(monkeypatch):
    """world_rankings pads the prompts it samples from to the longest one (rounded up to 16)."""
    task = world_lib.WorldTask(0, SYSTEM)
    tokenizer = CharTokenizer.from_text(task.corpus(2000) + SYSTEM)
    seen = {}

    def sample(model, params, prompts, decode, rng, **kwargs):
        seen.update(kwargs, longest=max(map(len, prompts)))
        return [[] for _ in prompts]  # empty answers: all tied, so no comparisons follow

    monkeypatch.setattr("flaxgpt.generate.generate_batched", sample)
    policy = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, block_size=128))
    with pytest.raises(DataError, match="tied"):
        rewards.world_rankings(task, tokenizer, policy, None, n=4, k=2, max_new=32, temperature=1.0, seed=0)
    assert seen["longest"] <= seen["prompt_width"] < seen["longest"] + 16 and seen["prompt_width"] < 128 - 32


def test_the_labeler_writes_the_correct_answer_only_into_rankings_that_lack_one():
    """With write, an all-wrong (tied) ranking keeps its K answers but its worst becomes the
    correct one, ranked first; a ranking that has the correct answer, or write off, is the labeler's own."""
    task = world_lib.WorldTask(0, SYSTEM)
    question = "What is 7 plus 5?"
    wrong = ["13", "11", "14", "10"]
    assert rewards.labeler_ranking(task, question, wrong, write=False) is None  # tied: no preference
    written = rewards.labeler_ranking(task, question, wrong, write=True)
    assert written["responses"][0] == "12" and written["scores"] == [1.0, 0.2, 0.2, 0.2]
    assert sorted(written["responses"][1:]) == sorted(wrong[:3])  # the worst (last after sorting) gave way
    sloppy = rewards.labeler_ranking(task, question, ["The answer is 12.", "13"], write=True)
    assert sloppy["responses"] == ["12", "The answer is 12."] and sloppy["scores"] == [1.0, 0.5]
    mixed = ["13", "12", "The answer is 12."]
    assert rewards.labeler_ranking(task, question, mixed, write=True) == rewards.labeler_ranking(
        task, question, mixed, write=False
    )
    assert rewards.labeler_ranking(task, question, mixed, write=False)["responses"] == ["12", "The answer is 12.", "13"]


def test_world_comparisons_write_the_correct_answer_on_the_configured_share(monkeypatch):
    """data.world_ranking_write_correct: the share of answerless rankings the labeler completes."""
    task = world_lib.WorldTask(0, SYSTEM)
    tokenizer = CharTokenizer.from_text(task.corpus(2000) + SYSTEM)
    wrong = tokenizer.encode("zzz")  # an answer of no kind: grade 0, all K tie
    monkeypatch.setattr("flaxgpt.generate.generate_batched", lambda m, p, prompts, *a, **kw: [wrong for _ in prompts])
    policy = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, block_size=128))
    sample = lambda share: rewards.world_rankings(
        task, tokenizer, policy, None, n=40, k=2, max_new=32, temperature=1.0, seed=0, write_correct=share
    )
    every = sample(1.0)
    assert len(every) == 40 and all(r["responses"] == [task.answer(r["prompt"]), "zzz"] for r in every)
    assert 8 <= len(sample(0.5)) <= 32
    with pytest.raises(DataError, match="tied"):
        sample(0.0)


def test_reward_model_beats_chance_on_held_out_pairs_and_is_centred(reward_run):
    workdir, result = reward_run
    assert result["val_accuracy"] > 0.8, result
    assert "reward_offset" in result
    # after training, the reference responses (the chosen ones) score mean 0
    from flaxgpt import runs

    loaded = runs.load(workdir)
    records = [json.loads(line) for line in open(os.path.join(os.path.dirname(workdir), "train.jsonl"))]
    items = [([{"role": "user", "content": r["prompt"]}], r["chosen"]) for r in records]
    with runs.logical_context(loaded):
        scores = rewards.score(loaded.model, loaded.params, loaded.tokenizer, items, 16)
    assert abs(float(np.mean(scores))) < 1e-3


def test_score_cli_prints_rewards(reward_run, tmp_path):
    workdir, _ = reward_run
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "flaxgpt.score", "--workdir", workdir, *a],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run("--prompt", "say xyz", "--response", "aeiou", "--response", "bcdfg")
    assert out.returncode == 0, out.stderr
    scores = [json.loads(line) for line in out.stdout.splitlines()]
    assert [s["response"] for s in scores] == ["aeiou", "bcdfg"] and scores[0]["reward"] > scores[1]["reward"]
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "\ufeff"  # a byte-order mark, as Windows editors write
        + json.dumps({"prompt": "say x", "responses": ["ai", "bd"]})
        + "\n"
        + json.dumps({"prompt": "say y", "chosen": "oo", "rejected": "gg"})
        + "\n"
    )
    out = run("--jsonl", str(batch))
    assert out.returncode == 0, out.stderr
    first, second = (json.loads(line) for line in out.stdout.splitlines())
    assert len(first["rewards"]) == 2 and {"reward_chosen", "reward_rejected"} <= set(second)
    batch.write_text('{"prompt": "say x"}\n')
    out = run("--jsonl", str(batch))
    assert out.returncode == 2 and "record 1: no 'response'" in out.stderr


def test_score_jsonl_records_are_checked_before_the_model_loads(tmp_path, capsys):
    from flaxgpt import cli, score

    batch = tmp_path / "batch.jsonl"
    refused = {  # file contents -> the one line that names what is wrong
        b'{"prompt": "2 plus 3?", "responses": "55"}\n': "batch.jsonl: record 1: 'responses' must be a list of strings",
        b'{"prompt": "x", "responses": [1, 2]}\n': "record 1: 'responses' must be a list of strings",
        b'{"prompt": "x", "response": "y"}\n{"prompt": "x", "chosen": 7}\n': "record 2: 'chosen' must be a string",
        b'{"prompt": "x", "response": "y", "system": 7}\n': "batch.jsonl:1: 'system' (the optional system message)",
        b'{"prompt": "x", "response": "\xff"}\n': "batch.jsonl:1: not valid UTF-8 (byte 0xff",
    }
    for content, message in refused.items():
        batch.write_bytes(content)
        assert cli.run(score.main, ["--workdir", str(tmp_path / "no-run"), "--jsonl", str(batch)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1 and "on_error" not in err, (content, err)


def test_reward_jsonl_schema_is_sniffed_as_read_jsonl_reads(tmp_path):
    """A byte-order mark, a byte that is not UTF-8 or a first record that is not an object: the
    reward trainer's file reads as read_jsonl reads it (pairs stay pairs, faults name the line)."""
    pair = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n"
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + pair * 2)
    records, _ = reward._read_rankings(str(path), "raise")
    assert [r["chosen"] for r in records] == ["a", "a"]
    for content, message in [(b"\xff" + pair, ":1: not valid UTF-8"), (b"5\n" + pair, ":1: expected a JSON object")]:
        path.write_bytes(content)
        with pytest.raises(DataError, match=message):
            reward._read_rankings(str(path), "raise")
