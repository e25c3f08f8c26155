"""`jaxinfer chat`: a multi-turn conversation in the terminal.

The model is loaded once; each answer streams token by token. Input: a line is one message; a
line ending in a backslash continues on the next one, and a line of three double quotes
starts and ends a block pasted as one message. Commands: /reset (forget the conversation),
/system TEXT (set the system message; /system alone removes it), /help, /exit (or Ctrl-D).
Ctrl-C stops the answer being written (what was written stays in the conversation) and at
the prompt only clears the line.

Every turn is encoded like `generate --chat` (`text.encode_prompt` on the messages). When the
conversation and the answer would not fit in the model's context, the oldest turns are
dropped, with a notice.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from jaxinfer.errors import InputError

HELP = ("Commands: /reset  forget the conversation; /system TEXT  set the system message "
        "(/system alone removes it); /exit  leave (or Ctrl-D). End a line with \\ to go on "
        'on the next one, or paste between lines of """. Ctrl-C stops an answer.')
BLOCK = '"""'


def read_message(read: Callable[[str], str]) -> str:
    """One message from `read` (input-like: prompt -> line; raises EOFError at the end):
    lines ending in a backslash continue on the next, and a line of three double quotes
    opens a block that the next such line closes (newlines kept)."""
    line = read("> ")
    if line.strip() == BLOCK:
        lines = []
        while (line := read("... ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    return "\n".join([*lines, line])


class Conversation:
    """The messages of a chat, kept within the model's context.

    model: a loaded Model with a chat template; gen: keyword arguments of
    `text.build_request` (max_new_tokens, sampling knobs, seed, stop, kv_cache); notice:
    where notes to the user go (a line each).
    """

    def __init__(self, model, gen: dict, system: str | None = None,
                 notice: Callable[[str], None] = print):
        if model.tokenizer is None or model.tokenizer.chat_template is None:
            raise InputError(f"{model.source}: the checkpoint has no chat template")
        self.model, self.gen, self.notice = model, gen, notice
        self.system = system
        self.turns: list[dict] = []  # user and assistant messages, oldest first

    def messages(self) -> list[dict]:
        """The system message (if any) and the turns, as the chat template takes them."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def command(self, line: str) -> bool | None:
        """Run a /command: True to go on, False to leave; None if `line` is not one."""
        word, _, rest = line.strip().partition(" ")
        if word in ("/exit", "/quit"):
            return False
        if word == "/reset":
            self.turns.clear()
            self.notice("(conversation forgotten)")
        elif word == "/system":
            self.system = rest.strip() or None
            self.notice(f"(system message {'set' if self.system else 'removed'})")
        elif word == "/help":
            self.notice(HELP)
        elif word.startswith("/") and " " not in line.strip():
            self.notice(f"(unknown command {word}; /help lists them)")
        else:
            return None
        return True

    def prompt_ids(self, text: str) -> list[int]:
        """Add the user message `text` and return the ids of the whole conversation (as
        `generate --chat` encodes it), the oldest turns dropped until it and the answer fit
        in the context. InputError, and the conversation left as it was, if the message
        cannot fit even alone."""
        from jaxinfer.text import encode_prompt

        head = self.messages()[:len(self.messages()) - len(self.turns)]
        turns = [*self.turns, {"role": "user", "content": text}]
        room = self.model.config.max_seq_len - self.gen["max_new_tokens"]
        dropped = 0
        while len(ids := encode_prompt(self.model, head + turns)) > room:
            if len(turns) == 1:
                raise InputError(f"the message takes {len(ids)} tokens with the system "
                                 f"message; at most {room} fit before the answer")
            # the oldest user message, and the answer to it
            turns = turns[2 if turns[1]["role"] == "assistant" and len(turns) > 2 else 1:]
            dropped += 1
        if dropped:
            self.notice(f"(the oldest {dropped} exchange{'s' * (dropped > 1)} dropped to fit "
                        f"the context of {self.model.config.max_seq_len} tokens)")
        self.turns = turns
        return ids

    def answer(self, text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to the user message `text` through write(piece) and keep it.
        Ctrl-C stops it: the part written so far is kept, with a notice. Returns it."""
        from jaxinfer.generate import stream_requests
        from jaxinfer.text import build_request

        ids = self.prompt_ids(text)
        req = build_request(self.model, [ids], **self.gen)
        pieces = []
        try:
            for ev in stream_requests(self.model, [None], req, chunk=16):
                pieces.append(ev.text)
                write(ev.text)
        except KeyboardInterrupt:
            write("\n")
            self.notice("(stopped)")
        else:
            write("\n")
        reply = "".join(pieces)
        self.turns.append({"role": "assistant", "content": reply})
        return reply


def _interruptible() -> None:
    """Ctrl-C raises KeyboardInterrupt here even when this process was started with SIGINT
    ignored (as a shell starts background jobs, and their children inherit), so that it stops
    an answer instead of doing nothing. Only the main thread can set it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run(conversation: Conversation, read: Callable[[str], str] | None = None,
        write: Callable[[str], None] | None = None) -> int:
    """The chat loop: read messages and commands (read: default `input`) until /exit or the
    end of input; answers go to write (default: stdout). Returns the exit status (0)."""
    read, write = read or input, write or _write_stdout
    _interruptible()
    while True:
        try:
            line = read_message(read)
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, the chat goes on
            write("\n")
            continue
        if not line.strip():
            continue
        going = conversation.command(line)
        if going is False:
            return 0
        if going is None:
            try:
                conversation.answer(line, write)
            except InputError as e:
                conversation.notice(f"error: {e}")


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
