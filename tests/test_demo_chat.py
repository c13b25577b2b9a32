"""The conversations `make demo-chat` writes (tools/demo_chat.py), checked on small hand-made inputs: the rows are
valid `messages` rows, the same for the same seed, and no held-out prompt or reply is trained on. The pipeline itself
(teacher, stores, students) is not run here."""

import json

import pytest
from click.testing import CliRunner

from storage.conversations import conversation_of
from storage.dataset_options import detect_format
from tools.demo_chat import (
    FUNCTION_PROMPT,
    PASSAGE_PROMPT,
    function_conversations,
    main,
    mix_conversations,
    passage_conversations,
    reuse,
    write_conversations,
)

PLAY = """ROMEO:
But soft, what light
through yonder window breaks?
It is the east,
and Juliet is the sun.
Arise, fair sun.

JULIET:
Ay me!
O Romeo.

Stage directions have no speaker
one
two
three
four

MERCUTIO:
a
b
c
d
e
f
g
h
i
j
"""

SOURCE = '''\x0c
def add(a, b):
    """Add two numbers.

    Integers or floats.
    """

    # the sum
    return a + b


class Box:
    def size(self):
        """The size
        of the box."""
        return len(self.items)

    def bare(self):
        """Only a docstring."""

    def undocumented(self):
        return 1


@decorated
async def fetch(
        url,
        retries):
    """Fetch a URL."""
    return url


def inline(x):
    """Docstring and code on one line."""; return x


def long(x):
    """Too long to ask about."""
    x += 1
    x += 1
    x += 1
    return x
'''


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def test_passages_ask_for_the_next_lines_of_each_speech_of_four_lines_or_more():
    assert passage_conversations(PLAY) == [
        [user(PASSAGE_PROMPT + "ROMEO:\nBut soft, what light\nthrough yonder window breaks?"),
         assistant("It is the east,\nand Juliet is the sun.\nArise, fair sun.")],
        [user(PASSAGE_PROMPT + "MERCUTIO:\na\nb\nc\nd"), assistant("e\nf\ng\nh")],  # at most 4 lines each
    ]
    assert passage_conversations(PLAY, max_chars=60) == [[user(PASSAGE_PROMPT + "MERCUTIO:\na\nb\nc\nd"),
                                                          assistant("e\nf\ng\nh")]]


def test_functions_are_asked_about_without_their_docstring_and_answered_with_its_first_paragraph():
    # The form feed before `add` is a line of its own for str.splitlines() but not for ast: the code must still be
    # cut at the lines ast names.
    assert function_conversations([SOURCE], max_lines=4) == [
        [user(FUNCTION_PROMPT + "def add(a, b):\n    # the sum\n    return a + b"), assistant("Add two numbers.")],
        [user(FUNCTION_PROMPT + "def size(self):\n    return len(self.items)"), assistant("The size of the box.")],
        [user(FUNCTION_PROMPT + "async def fetch(\n        url,\n        retries):\n    return url"),
         assistant("Fetch a URL.")],
    ]
    assert len(function_conversations([SOURCE], max_lines=5)) == 4  # `long` too
    assert len(function_conversations([SOURCE], max_lines=5, max_chars=90)) == 2  # `add` and `size` only


def pools(size: int) -> list[tuple[str, list[list[dict]]]]:
    verse = [[user(f"{PASSAGE_PROMPT}line {i}"), assistant(f"line {i + 1}")] for i in range(0, 2 * size, 2)]
    code = [[user(f"{FUNCTION_PROMPT}def f{i}(): pass"), assistant(f"Function {i}.")] for i in range(size)]
    return [("Verse.", verse), ("Code.", code)]


def test_mixed_conversations_are_valid_messages_rows_drawn_evenly_from_the_pools():
    train, heldout = mix_conversations(pools(20), train=24, heldout=8, seed=1, system_share=0.5)
    assert len(train) == 24 and len(heldout) == 8
    for index, messages in enumerate(train + heldout):
        checked, _ = conversation_of({"messages": messages}, "messages", index, ["messages"])  # raises if invalid
        assert checked == messages
        roles = [turn["role"] for turn in messages]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(turn["content"].strip() for turn in messages)
        if roles[0] == "system":  # each pool's own system prompt
            assert messages[0]["content"] == ("Verse." if messages[1]["content"].startswith(PASSAGE_PROMPT)
                                              else "Code.")
    assert sum(m[-2]["content"].startswith(PASSAGE_PROMPT) for m in heldout) == 4  # the pools taken in turn
    systems = sum(m[0]["role"] == "system" for m in train + heldout)
    assert 0 < systems < 32


def test_mixed_conversations_are_the_same_for_a_seed_and_differ_across_seeds():
    first = mix_conversations(pools(20), train=24, heldout=8, seed=3)
    assert mix_conversations(pools(20), train=24, heldout=8, seed=3) == first
    assert mix_conversations(pools(20), train=24, heldout=8, seed=4) != first


def test_no_heldout_prompt_or_reply_is_trained_on_even_when_the_sources_repeat_one():
    (system, verse), code = pools(10)
    repeats = [[user("Same prompt"), assistant(f"Reply {i}")] for i in range(5)]
    repeats += [[user(f"Prompt {i}"), assistant("Same reply")] for i in range(5)]
    mixed = [(system, verse + repeats + verse), code]
    for seed in range(5):
        train, heldout = mix_conversations(mixed, train=20, heldout=2, seed=seed, system_share=0.0)
        contents = [turn["content"] for m in train + heldout for turn in m]
        assert len(contents) == len(set(contents))  # no prompt or reply twice, so none both trained and held out
    with pytest.raises(ValueError, match="need 23 distinct ones, and the sources give 22"):
        mix_conversations(mixed, train=21, heldout=2, seed=0)


def test_written_rows_read_back_as_a_messages_dataset(tmp_path):
    train, _ = mix_conversations(pools(4), train=6, heldout=2, seed=0)
    path = write_conversations(tmp_path / "chat" / "train.jsonl", train)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["messages"] for row in rows] == train
    assert detect_format(sorted({key for row in rows for key in row})) == "messages"
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary file left


def test_a_step_output_is_kept_only_for_the_inputs_it_was_made_from(tmp_path):
    output = tmp_path / "store"
    assert not reuse(output, ["teacher", 512])
    output.mkdir()
    (output / "part").write_text("done")
    assert reuse(output, ["teacher", 512]) and (output / "part").exists()
    assert not reuse(output, ["teacher", 256]) and not output.exists()  # other inputs: started again
    output.mkdir()
    assert reuse(output, ["teacher", 256]) and not reuse(output, ["teacher", 512]) and not output.exists()


def test_sizes_the_sources_cannot_give_are_refused_before_the_teacher_is_converted(tmp_path):
    result = CliRunner().invoke(main, ["--dir", str(tmp_path), "--train-conversations", "100000"])
    assert result.exit_code == 2, result.output
    assert "need 100128 distinct ones" in result.output and "lower --train-conversations" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "smollm2").exists()
    result = CliRunner().invoke(main, ["--dir", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output, result.output
