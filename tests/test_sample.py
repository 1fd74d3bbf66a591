"""`python -m flaxgpt.sample`: the model's end token ends a completion, prompts that leave too little
of the context get what room there is (or slide past it with --sliding-window)."""

import jax
import pytest

from flaxgpt import chat_template, cli, generate, runs, sample
from flaxgpt.data.tokenizers import END_OF_TURN
from flaxgpt.trainers import pretrain
from tests.conftest import tiny_run_config

BLOCK = 32
PROMPT = "Question: What is"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sample") / "run")
    cfg = tiny_run_config(
        train={"max_steps": 12}, eval={"interval": 12, "sample_tokens": 0}, checkpoint={"every_steps": 12}
    )
    pretrain.run(cfg, path)
    return path


@pytest.fixture(scope="module")
def loaded(workdir):
    return runs.load(workdir)


def _greedy(loaded, prompt: str, n: int) -> list[int]:
    """The engine's greedy continuation, stopped where sample stops (one compiled program for both)."""
    ids, stops = loaded.tokenizer.encode_prompt(prompt), chat_template.stop_tokens(loaded.tokenizer)
    cfg = generate.DecodeConfig(max_new_tokens=n, temperature=0)
    with runs.logical_context(loaded):
        out = generate.generate(
            loaded.model, loaded.params, [ids], cfg, jax.random.PRNGKey(0), pad_id=0, stop_tokens=stops
        )
    return generate.completions(out, stops)[0]


def _sample(workdir, capsys, *args: str) -> tuple[int, list[str], str]:
    status = cli.run(sample.main, ["--workdir", workdir, "--temperature", "0", *args])
    captured = capsys.readouterr()
    return status, [b.strip("\n") for b in captured.out.split("-" * 40) if b.strip()], captured.err


def test_sample_stops_at_the_end_token_and_does_not_print_it(workdir, loaded, capsys, monkeypatch):
    free = _greedy(loaded, PROMPT, 8)
    tok = loaded.tokenizer
    # make a token the model produces (the first new one after its first) this run's <|end|>:
    # the completion must end before it
    at = next((i for i, t in enumerate(free) if i and t not in free[:i]), 0)
    monkeypatch.setitem(tok.specials, END_OF_TURN, free[at])
    monkeypatch.setattr(runs, "load", lambda *_, **__: loaded)
    status, printed, _ = _sample(workdir, capsys, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert status == 0 and printed == [PROMPT + tok.decode(free[:at])]
    # the same through the sliding window (prompt + new tokens past the context)
    status, printed, _ = _sample(workdir, capsys, "--prompt", PROMPT, "--max-new-tokens", "40", "--sliding-window")
    assert status == 0 and printed == [PROMPT + tok.decode(free[:at])]


def test_a_prompt_near_the_context_gets_the_room_left_with_a_note(workdir, loaded, capsys):
    prompt = "Question: " + "a" * (BLOCK - 15)  # leaves 5 tokens of the 32
    n = BLOCK - len(loaded.tokenizer.encode_prompt(prompt))
    status, printed, err = _sample(workdir, capsys, "--prompt", prompt)  # the default --max-new-tokens 100
    assert status == 0 and printed == [prompt + loaded.tokenizer.decode(_greedy(loaded, prompt, n))]
    assert err == (
        f"note: {n} new tokens, not 100: the longest prompt ({BLOCK - n} tokens) leaves no more of the "
        f"model's block_size {BLOCK} (--sliding-window continues past it)\n"
    )


def test_sliding_window_continues_past_the_context(workdir, loaded, capsys):
    status, printed, _ = _sample(workdir, capsys, "--prompt", PROMPT, "--max-new-tokens", "40", "--sliding-window")
    assert status == 0
    new = printed[0][len(PROMPT) :]
    # inside the context the recomputed window predicts what the cache does; then it goes on
    assert new.startswith(loaded.tokenizer.decode(_greedy(loaded, PROMPT, 8))) and len(new) > BLOCK - len(PROMPT)
    long = "Question: " + "b" * 40  # longer than the context: its last 32 tokens are kept
    assert _sample(workdir, capsys, "--prompt", long, "--max-new-tokens", "3", "--sliding-window")[0] == 0


def test_a_prompt_that_fills_the_context_is_one_line(workdir, capsys):
    status, printed, err = _sample(workdir, capsys, "--prompt", "a" * 40)
    assert status == 2 and printed == []
    assert err == (
        f"error: the longest prompt (40 tokens) fills the model's block_size {BLOCK}: shorten it, "
        f"or pass --sliding-window to continue from its last {BLOCK} tokens\n"
    )
    status, _, err = _sample(workdir, capsys, "--prompt", "a" * 40, "--sliding-window", "--num-beams", "2")
    assert status == 2 and err == "error: --sliding-window samples one token at a time: use it with --num-beams 1\n"
