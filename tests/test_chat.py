"""The chat template, and the sample / chat CLIs on a small trained workdir."""

import json
import subprocess
import sys

import jax
import pytest

from flaxgpt import chat, chat_template, cli, generate, runs, sample
from flaxgpt.chat import ChatSession, repl
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


def test_every_training_path_refuses_an_answer_whose_question_does_not_fit():
    from flaxgpt.conversations import chat_prompt, conversation_example
    from flaxgpt.preference import Feedback, Pair, feedback_rows, pair_rows
    from flaxgpt.rewards import response_ids

    question = "what is the capital " * 5  # 100 characters: more than the block, the answer alone fits
    conversation = chat_prompt(question) + [{"role": "assistant", "content": "paris"}]
    refused = "the latest user turn and what follows it need more than"
    with pytest.raises(ValueError, match=refused):
        chat_template.render(conversation, TOK, 64, add_generation_prompt=False)
    for train in (
        lambda: conversation_example(conversation, TOK, 64),  # SFT
        lambda: pair_rows([Pair(chat_prompt(question), "paris", "rome")], TOK, 64),  # DPO / ORPO
        lambda: feedback_rows([Feedback(chat_prompt(question), "paris", True)], TOK, 64),  # KTO, online
        lambda: response_ids(chat_prompt(question), "paris", TOK, 64),  # reward model
    ):
        with pytest.raises(ValueError, match=refused):
            train()
    assert TOK.decode(conversation_example(conversation, TOK, 200)[0]).startswith(USER + question)


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
    loaded = runs.load(workdir)
    prompts = ["Question: What", "Answer:"]
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    with runs.logical_context(loaded):
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
    loaded = runs.load(workdir)
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


@pytest.fixture(scope="module")
def loaded(workdir):
    return runs.load(workdir)


def _session(loaded):  # every REPL test answers "/hi" to an empty conversation: one compiled program
    return ChatSession(loaded, generate.DecodeConfig(max_new_tokens=8, temperature=0.0))


def _drive(session, lines, write=None):
    """Run the REPL on `lines` (an exception in them is raised as the key the user pressed);
    returns (what it wrote, the lines it never read)."""
    out, feed = [], iter(lines)

    def read(prompt):
        item = next(feed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    repl(session, read=read, write=write or out.append)
    return "".join(out), list(feed)


def test_chat_refuses_a_message_too_long_and_unknown_commands_and_goes_on(workdir, loaded, capsys):
    session = _session(loaded)
    out, unread = _drive(session, ["x" * 500, "/frobnicate now", "//hi", "/help", "/quit", "never"])
    lines = out.splitlines()
    too_long = [line for line in lines if line.startswith("(message not sent: ")]
    assert len(too_long) == 1 and "more than the 56 available" in too_long[0]
    assert "(unknown command /frobnicate, not sent; commands: /reset, /system TEXT, /help, /quit;" in out
    assert "(commands: /reset" in out and unread == ["never"]
    assert out.count("assistant> ") == 1  # the session went on; "//" sends a message starting with "/"
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["/hi"]
    # a one-shot --prompt too long is a user error: one line, exit 2
    assert cli.run(chat.main, ["--workdir", workdir, "--prompt", "x" * 500]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: message not sent: ") and err.count("\n") == 1


def test_ctrl_c_at_the_prompt_warns_once_and_twice_leaves(loaded):
    session = _session(loaded)
    out, unread = _drive(session, [KeyboardInterrupt(), "/reset", KeyboardInterrupt(), KeyboardInterrupt(), "never"])
    assert out.count("(Ctrl-C again or Ctrl-D to leave)") == 2 and unread == ["never"]
    out, unread = _drive(session, [EOFError(), "never"])  # Ctrl-D leaves at once
    assert unread == ["never"]


_CTRL_C_SCRIPT = r"""
import json, os, signal, sys, threading
from flaxgpt import runs
from tests.test_chat import _drive, _session
loaded = runs.load(sys.argv[1])
full = _session(loaded).reply("/hi", on_text=lambda piece: None)
session = _session(loaded)
out = []
def write(text):  # the first streamed piece (written from the engine's thread) presses Ctrl-C
    out.append(text)
    if threading.current_thread() is not threading.main_thread() and not session.stop.is_set():
        os.kill(os.getpid(), signal.SIGINT)
        assert session.stop.wait(10)
signal.signal(signal.SIGINT, signal.default_int_handler)
_, unread = _drive(session, ["//hi", "/quit", "never"], write=write)
print(json.dumps({"full": full, "out": out, "unread": unread, "messages": session.messages}))
"""


def test_ctrl_c_while_answering_stops_that_answer_and_returns_to_the_prompt(workdir):
    """In a process of its own: SIGINT reaches a process's main thread, which a test worker's
    main thread need not be."""
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_SCRIPT, workdir], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    out, full = got["out"], got["full"]
    first = out[out.index("assistant> ") + 1]
    assert len(full) > len(first) and full.startswith(first)
    assert out[out.index("assistant> ") + 2] == " (stopped)\n" and got["unread"] == ["never"]
    assert got["messages"] == [{"role": "user", "content": "/hi"}, {"role": "assistant", "content": first}]


def test_line_editing_comes_from_readline():
    assert chat._enable_line_editing() and "readline" in sys.modules


def test_sample_refuses_a_prompt_that_leaves_no_room_in_one_line(workdir, capsys):
    assert cli.run(sample.main, ["--workdir", workdir, "--prompt", "a" * 64, "--max-new-tokens", "8"]) == 2
    assert capsys.readouterr().err == (
        "error: the longest prompt (64 tokens) fills the model's block_size 64: shorten it, "
        "or pass --sliding-window to continue from its last 64 tokens\n"
    )
