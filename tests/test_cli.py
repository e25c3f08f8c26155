"""The `jaxinfer` command line: JSON outputs, bench keys, and one clear error per bad input."""

import json
import subprocess
import sys

import pytest

from jaxinfer.cli import main

BASE = ["--no-compile-cache"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_batch(capsys, smollm2_gguf_path):
    code, out, _ = run_cli(capsys, "generate", "--model", str(smollm2_gguf_path), *BASE,
                           "--prompt", "What is 2+2?", "--prompt", "Name a color.", "--chat",
                           "--max-new-tokens", "6", "--json")
    assert code == 0
    data = json.loads(out)
    assert [o["prompt"] for o in data["outputs"]] == ["What is 2+2?", "Name a color."]
    for o in data["outputs"]:
        assert 1 <= len(o["token_ids"]) <= 6
        assert o["finish_reason"] in ("stop", "length")
        assert isinstance(o["text"], str)
    assert data["timings"]["generated_tokens"] == sum(len(o["token_ids"]) for o in data["outputs"])


def test_bench_json_keys(capsys, smollm2_gguf_path):
    code, out, _ = run_cli(capsys, "bench", "--model", str(smollm2_gguf_path), *BASE,
                           "--prompt-len", "16", "--new-tokens", "4", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "compile_s",
                "peak_rss_mb", "weight_bytes"):
        assert key in data
    assert data["weight_bytes"] > 500_000_000 and data["decode_tokens_per_s"] > 0
    from jaxinfer import kernels

    assert data["cpu_isa"] == kernels.isa() and data["cpu_kernels"] == kernels.describe()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", ""], "--prompt must not be empty"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "top_k must be an integer >= 0"),
    (["generate", "--prompt", "hi", "--min-p", "2"], "min_p must be in [0, 1]"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "no such file or directory"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["serve", "--prefill-tokens", "24"], "--prefill-tokens must be a power of two"),
])
def test_bad_input_one_error_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv, *BASE)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and out == ""


def test_prompt_longer_than_context(capsys, smollm2_gguf_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(smollm2_gguf_path), *BASE,
                           "--prompt", "word " * 9000, "--max-new-tokens", "4")
    assert code == 2 and "exceeds the model's context of 8192" in err


def test_module_entry_point_reports_errors():
    proc = subprocess.run([sys.executable, "-m", "jaxinfer", "generate", "--prompt", "hi",
                           "--model", "/no/such", "--no-compile-cache"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_eval_json(capsys, smollm2_gguf_path, tmp_path):
    from jaxinfer.bench import english_text

    text = tmp_path / "t.txt"
    text.write_text(english_text()[:3000])
    code, out, _ = run_cli(capsys, "eval", "--model", str(smollm2_gguf_path), *BASE,
                           "--text-file", str(text), "--context", "128", "--stride", "64",
                           "--max-tokens", "300", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["tokens"] == 299 and 2 < data["perplexity"] < 100


def test_eval_bad_inputs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", *BASE, "--text-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err
    (tmp_path / "t.txt").write_text("hello")
    code, _, err = run_cli(capsys, "eval", *BASE, "--text-file", str(tmp_path / "t.txt"),
                           "--stride", "0")
    assert code == 2 and "--stride" in err


def test_quantize_offers_only_methods_that_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--quant", "int4", "--method", "awq", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'awq'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--method", "gptq"], "needs --calibration-file"),
    (["--quant", "native"], "nothing to save"),
])
def test_quantize_bad_inputs(capsys, tmp_path, extra, message):
    argv = ["quantize", "--quant", "int4", "--out", str(tmp_path / "out"), *extra]
    if "--quant" in extra:
        argv = ["quantize", "--out", str(tmp_path / "out"), *extra]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_existing_out(capsys, tmp_path):
    code, _, err = run_cli(capsys, "quantize", "--quant", "int8", "--out", str(tmp_path))
    assert code == 2 and "already exists" in err


def test_quantize_saves_and_generate_loads(capsys, tmp_path, smollm2_gguf_path):
    out = tmp_path / "q8"
    code, _, _ = run_cli(capsys, "quantize", "--model", str(smollm2_gguf_path), "--quant", "int8",
                         "--out", str(out))
    assert code == 0 and (out / "quantization.json").is_file()
    code, stdout, _ = run_cli(capsys, "generate", "--model", str(out), *BASE, "--prompt", "Hi",
                              "--chat", "--max-new-tokens", "4", "--json")
    assert code == 0 and json.loads(stdout)["outputs"][0]["token_ids"]
    code, stdout, _ = run_cli(capsys, "devices", "--model", str(out), *BASE, "--json")
    assert code == 0 and json.loads(stdout)["placement"]["mesh"] == {"data": 1, "model": 1}


def test_every_entry_point_encodes_a_conversation_alike(capsys, smollm2, monkeypatch):
    """chat, generate --chat and the Python API give the engine the same prompt ids."""
    import jaxinfer
    from jaxinfer import generate as gen
    from jaxinfer.text import encode_prompt, stream

    seen = []
    real = gen.validate_request

    def record(model, req):
        seen.append([list(p) for p in req.prompts])
        return real(model, req)

    monkeypatch.setattr(gen, "validate_request", record)
    monkeypatch.setattr(jaxinfer, "load", lambda *a, **k: smollm2)
    lines = iter(["Hi there", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    gen_args = ("--no-compile-cache", "--max-new-tokens", "2", "--system", "Be brief.")
    assert main(["chat", *gen_args]) == 0
    assert main(["generate", *gen_args, "--chat", "--prompt", "Hi there"]) == 0
    list(stream(smollm2, "Hi there", chat=True, system="Be brief.", max_new_tokens=2))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = encode_prompt(smollm2, messages)
    assert "Be brief." in smollm2.tokenizer.decode(want) and "Hi there" in smollm2.tokenizer.decode(want)
    assert len(seen) >= 3 and all(s == [want] for s in seen), seen  # one or more per path


def test_recipes_default_group_and_errors(smollm2):
    from jaxinfer.errors import InputError
    from jaxinfer.quant.recipes import default_group_size, quantize_model, recipe_rules

    assert default_group_size(smollm2.params) == 64  # 576 is not a multiple of 128
    rules = recipe_rules(smollm2.params, "int8", None, True, "int8")
    assert ("embed", rules[-1][1]) == rules[-1]  # the tied embedding/head is int8 too
    with pytest.raises(InputError, match="unknown quantization scheme"):
        recipe_rules(smollm2.params, "int3", None, True, "int8")
    with pytest.raises(InputError, match="int4 only"):
        recipe_rules(smollm2.params, "int8", 64, True, "int8")
    with pytest.raises(InputError, match="calibration text"):
        quantize_model(smollm2, "int4", method="gptq")
