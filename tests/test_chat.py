"""`jaxinfer chat`: the conversation kept within the context, commands, multi-line input, and
the command itself driven through a pseudo-terminal (pexpect) on SmolLM2."""

import dataclasses
import os
import re
import subprocess
import sys

import pexpect
import pytest

from jaxinfer.chat import Conversation, read_message, run
from jaxinfer.errors import InputError
from jaxinfer.text import encode_prompt, generate

GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


def lines(*items):
    """An input()-like reader over items, then EOFError."""
    it = iter(items)

    def read(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_read_message_continues_lines_and_blocks():
    assert read_message(lines("one line")) == "one line"
    assert read_message(lines("first \\", "second\\", "third")) == "first \nsecond\nthird"
    assert read_message(lines('"""', "a", "", "  b", '"""', "next")) == "a\n\n  b"


def test_commands_and_history(smollm2):
    notes = []
    conv = Conversation(smollm2, GREEDY, system="Be brief.", notice=notes.append)
    out = []
    assert run(conv, lines("Hi", "/system Answer in French.", "/nope", "/help"), out.append) == 0
    assert [m["role"] for m in conv.messages()] == ["system", "user", "assistant"]
    assert conv.messages()[0]["content"] == "Answer in French."
    assert notes[:2] == ["(system message set)", "(unknown command /nope; /help lists them)"]
    assert "/reset" in notes[2]
    assert conv.command("/reset") and conv.turns == [] and notes[-1] == "(conversation forgotten)"
    assert conv.command("/system") and conv.system is None
    assert conv.command("/exit") is False and conv.command("just text") is None
    answer = generate(smollm2, "Hi", chat=True, system="Be brief.", **GREEDY)[0].text
    assert "".join(out).startswith(answer + "\n")  # the first answer, as generate --chat


def test_oldest_turns_dropped_to_fit_the_context(smollm2, monkeypatch):
    notes = []
    conv = Conversation(smollm2, GREEDY, notice=notes.append)
    conv.turns = [{"role": r, "content": f"{r} {i} " + "word " * 40}
                  for i in range(3) for r in ("user", "assistant")]
    whole = len(encode_prompt(smollm2, conv.messages() + [{"role": "user", "content": "Hi"}]))
    config = dataclasses.replace(smollm2.config, max_seq_len=whole + GREEDY["max_new_tokens"] - 1)
    monkeypatch.setattr(conv, "model", dataclasses.replace(smollm2, config=config))
    ids = conv.prompt_ids("Hi")
    assert [m["content"].split()[:2] for m in conv.turns[:2]] == [["user", "1"], ["assistant", "1"]]
    assert notes == [f"(the oldest 1 exchange dropped to fit the context of {config.max_seq_len} "
                     "tokens)"]
    assert ids == encode_prompt(smollm2, conv.messages())
    kept = list(conv.turns)
    with pytest.raises(InputError, match="at most"):
        conv.prompt_ids("word " * config.max_seq_len)
    assert conv.turns == kept  # a message that cannot fit changes nothing


def test_no_chat_template_is_one_error(smollm2):
    model = dataclasses.replace(smollm2, tokenizer=None, source="x")
    with pytest.raises(InputError, match="no chat template"):
        Conversation(model, GREEDY)


ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def text_of(raw: str) -> str:
    return ANSI.sub("", raw).replace("\r\n", "\n")


# pexpect forks this (multithreaded, JAX) process; the child only execs the command.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_chat_in_a_terminal(smollm2_gguf_path):
    """Two turns (the second typed on two lines), /reset, Ctrl-C during an answer (the chat
    goes on) and /exit, through a pseudo-terminal. The first answer is greedy `jaxinfer
    generate --chat`'s with the same defaults (so the same weights: where the native kernels
    run, the GGUF's Q4_1 blocks with activations quantized, whose answer to this prompt is not
    the float32 model's on every CPU: its two likeliest first tokens are 0.06-0.35 apart in
    log-prob, and on a Zen 4 it begins "L'Étoile, la Marseillaise", as llama.cpp's greedy
    answer on the same file does there, not "The capital")."""
    first = "What is the capital of France?"
    want = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "--chat", "--model",
                           str(smollm2_gguf_path), "--prompt", first, "--temperature", "0",
                           "--max-new-tokens", "48"], capture_output=True, text=True,
                          check=True, timeout=240).stdout.removesuffix("\n")
    assert want.strip()
    child = pexpect.spawn(sys.executable, ["-m", "jaxinfer", "chat", "--model",
                                           str(smollm2_gguf_path), "--temperature", "0",
                                           "--max-new-tokens", "48"],
                          env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=240)
    try:
        child.expect_exact("Ctrl-C stops an answer.")
        child.expect_exact("> ")
        child.sendline(first)
        child.expect_exact(first + "\r\n")  # the terminal's echo
        child.expect_exact("\r\n> ")
        assert text_of(child.before) == want

        child.sendline("And of Italy? \\")
        child.expect_exact("... ")
        child.sendline("One word.")
        child.expect_exact("One word.\r\n")
        child.expect_exact("\r\n> ")
        assert text_of(child.before).strip()

        child.sendline("/reset")
        child.expect_exact("(conversation forgotten)")
        child.expect_exact("> ")
        child.sendline("Count from 1 to 100, separated by commas.")
        child.expect_exact("commas.\r\n")
        child.expect(r"\d")  # the answer is being written
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
