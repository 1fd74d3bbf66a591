"""The chat template, and the sample / chat CLIs on a small trained workdir."""

import subprocess
import sys

import jax
import pytest

from flaxgpt import chat_template, generate
from flaxgpt import runs as inference
from flaxgpt.chat import ChatSession
from flaxgpt.data.tokenizers import ASSISTANT, END_OF_TURN, SYSTEM, USER, CharTokenizer
from flaxgpt.trainers import pretrain
from tests.conftest import REPO, tiny_run_config

TOK = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789 ?")


def test_template_renders_roles_and_marks_assistant_tokens():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
    ]
    out = chat_template.render(messages, TOK, 200)
    assert (
        TOK.decode(out.ids) == f"{SYSTEM}be brief{END_OF_TURN}{USER}hi{END_OF_TURN}{ASSISTANT}yo{END_OF_TURN}"
        f"{USER}ok?{END_OF_TURN}{ASSISTANT}"
    )
    learned = TOK.decode([t for t, m in zip(out.ids, out.assistant_mask) if m])
    assert learned == f"yo{END_OF_TURN}" and out.dropped_turns == 0


def test_oldest_turns_are_dropped_first_and_the_system_message_stays():
    messages = [{"role": "system", "content": "sys"}] + [
        {"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant"] * 3)
    ]
    full = chat_template.render(messages, TOK, 1000)
    assert full.dropped_turns == 0 and "turn 0" in TOK.decode(full.ids)
    cut = chat_template.render(messages, TOK, len(full.ids) - 5)  # one turn must go
    text = TOK.decode(cut.ids)
    assert cut.dropped_turns == 2 and len(cut.ids) <= len(full.ids) - 5  # the whole first exchange
    assert text.startswith(f"{SYSTEM}sys{END_OF_TURN}{USER}turn 2") and "turn 0" not in text
    assert text.endswith(f"turn 5{END_OF_TURN}{ASSISTANT}")
    with pytest.raises(ValueError, match="system message and the latest turn alone"):
        chat_template.render(messages, TOK, 12)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat") / "run")
    pretrain.run(
        tiny_run_config(train={"max_steps": 20}, eval={"interval": 20, "sample_tokens": 0}, model={"block_size": 64}),
        path,
    )
    return path


def _cli(module, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300
    )


def test_sample_cli_prints_the_engine_s_greedy_completions(workdir):
    loaded = inference.load(workdir)
    prompts = ["Question: What", "Answer:"]
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    with inference.logical_context(loaded):
        out = generate.generate(
            loaded.model,
            loaded.params,
            ids,
            generate.DecodeConfig(max_new_tokens=12, temperature=0),
            jax.random.PRNGKey(0),
            pad_id=loaded.tokenizer.pad_id,
            stop_tokens=[loaded.tokenizer.eos_id],
        )
    expected = [
        p + loaded.tokenizer.decode(c) for p, c in zip(prompts, generate.completions(out, [loaded.tokenizer.eos_id]))
    ]
    result = _cli(
        "flaxgpt.sample",
        "--workdir",
        workdir,
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = [block.strip("\n") for block in result.stdout.split("-" * 40) if block.strip()]
    assert printed == expected
    bad = _cli("flaxgpt.sample", "--workdir", workdir, "--step", "999", "--prompt", "x")
    assert bad.returncode == 2 and "no checkpoint at step 999" in bad.stderr


def test_chat_streams_remembers_and_obeys_commands(workdir):
    loaded = inference.load(workdir)
    session = ChatSession(loaded, generate.DecodeConfig(max_new_tokens=10, temperature=0.0), system="Be brief.")
    pieces = []
    answer = session.reply("What is 2 plus 3?", on_text=pieces.append)
    assert "".join(pieces) == answer and len(session.messages) == 2
    session.reply("And 4 plus 4?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    one_shot = _cli(
        "flaxgpt.chat",
        "--workdir",
        workdir,
        "--prompt",
        "What is 2 plus 3?",
        "--system",
        "Be brief.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
    )
    assert one_shot.returncode == 0 and one_shot.stdout.strip() == answer.strip()
    talk = _cli(
        "flaxgpt.chat",
        "--workdir",
        workdir,
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        stdin="/system Answer in one word.\nhello\n/reset\nhi\n/quit\nnever read\n",
    )
    assert talk.returncode == 0, talk.stderr[-2000:]
    assert "(system message: 'Answer in one word.')" in talk.stdout and "(conversation forgotten)" in talk.stdout
    assert talk.stdout.count("assistant> ") == 2
