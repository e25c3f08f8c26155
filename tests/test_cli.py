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
    from jaxinfer import kernels

    assert data["weights"] == ("native Q4_1/Q8_0, float32" if kernels.available() else "float32")


def test_generate_penalty_flags_equal_the_library(capsys, smollm2_gguf_path):
    """--presence-penalty / --frequency-penalty / --min-tokens give the library's tokens for
    the same knobs (greedy, float weights), and --json reports them."""
    import jaxinfer
    from jaxinfer.text import generate

    prompt, knobs = "Count: one, two, three,", dict(presence_penalty=0.8, frequency_penalty=1.5)
    code, out, _ = run_cli(capsys, "generate", "--model", str(smollm2_gguf_path), *BASE,
                           "--quant", "none", "--prompt", prompt, "--temperature", "0",
                           "--max-new-tokens", "12", "--presence-penalty", "0.8",
                           "--frequency-penalty", "1.5", "--min-tokens", "12", "--json")
    assert code == 0
    data = json.loads(out)
    model = jaxinfer.load(smollm2_gguf_path, progress=False)
    want = generate(model, prompt, max_new_tokens=12, temperature=0.0, min_tokens=12, **knobs)[0]
    plain = generate(model, prompt, max_new_tokens=12, temperature=0.0)[0]
    assert data["outputs"][0]["token_ids"] == want.token_ids != plain.token_ids
    assert {k: data["sampling"][k] for k in ("presence_penalty", "frequency_penalty",
                                             "min_tokens")} == {**knobs, "min_tokens": 12}


def test_bench_json_keys(capsys, smollm2_gguf_path):
    code, out, _ = run_cli(capsys, "bench", "--model", str(smollm2_gguf_path), *BASE,
                           "--prompt-len", "16", "--new-tokens", "4", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "compile_s",
                "peak_rss_mb", "weight_bytes"):
        assert key in data
    from jaxinfer import kernels

    assert data["decode_tokens_per_s"] > 0
    if kernels.available():  # --quant auto: the file's Q4_1 / Q8_0 blocks, kept packed
        assert data["weights"] == "native Q4_1/Q8_0, float32"
        assert 90_000_000 < data["weight_bytes"] < 110_000_000
    else:
        assert data["weights"] == "float32" and data["weight_bytes"] > 500_000_000

    assert data["cpu_isa"] == kernels.isa() and data["cpu_kernels"] == kernels.describe()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", ""], "--prompt must not be empty"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "top_k must be an integer >= 0"),
    (["generate", "--prompt", "hi", "--min-p", "2"], "min_p must be in [0, 1]"),
    (["generate", "--prompt", "hi", "--presence-penalty", "3"], "presence_penalty must be in"),
    (["chat", "--frequency-penalty", "-2.5"], "frequency_penalty must be in [-2, 2]"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "4", "--min-tokens", "5"],
     "--min-tokens (5) exceeds --max-new-tokens (4)"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "no such file or directory"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["serve", "--prefill-tokens", "24"], "--prefill-tokens must be a power of two"),
    (["serve", "--aging", "-1"], "--aging must be >= 0 prompt tokens per second"),
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


def test_kv_cache_choices_are_the_engines():
    """The CLI writes engine.KV_CACHES's keys out (it parses arguments before importing jax)."""
    from jaxinfer import engine
    from jaxinfer.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("generate", "chat", "bench", "eval", "serve"):
        kv = next(a for a in sub[command]._actions if a.dest == "kv_cache")
        assert list(kv.choices) == list(engine.KV_CACHES), command


def test_module_entry_point_writes_all_its_output_before_exiting():
    """`python -m jaxinfer` ends without the interpreter's teardown (cli.run): what it printed
    into a pipe still arrives whole, and its exit code is main's."""
    proc = subprocess.run([sys.executable, "-m", "jaxinfer", "devices"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert " devices over 1 process(es)" in lines[0]
    assert lines[-1].startswith("native CPU kernels") and len(lines) >= 4


def test_eval_json(capsys, smollm2_gguf_path, tmp_path):
    from jaxinfer.bench import english_text

    text = tmp_path / "t.txt"
    text.write_text(english_text()[:3000])
    from jaxinfer import kernels

    runs = {}
    for quant in ("auto", "none"):
        code, out, _ = run_cli(capsys, "eval", "--model", str(smollm2_gguf_path), *BASE,
                               "--text-file", str(text), "--context", "128", "--stride", "64",
                               "--max-tokens", "300", "--json", "--quant", quant)
        assert code == 0
        runs[quant] = data = json.loads(out)
        assert data["tokens"] == 299 and 2 < data["perplexity"] < 100
    assert runs["none"]["weights"] == "float32"
    if kernels.available():  # the packed blocks with activations quantized per block of 32
        assert runs["auto"]["weights"] == "native Q4_1/Q8_0, float32"
        assert abs(runs["auto"]["perplexity"] / runs["none"]["perplexity"] - 1) < 0.01


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


# ----------------------------------------------------------------------------- sampling defaults


def test_sampling_defaults_flags_then_checkpoint_then_fallback():
    from jaxinfer.sampling import FALLBACK, GGUF_KEYS, HF_KEYS, checkpoint_defaults, resolve

    assert FALLBACK == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                        "repetition_penalty": 1.0}
    gguf = {"general.sampling.temp": 0.6, "general.sampling.top_k": 20,
            "general.sampling.top_p": 0.0, "general.name": "x"}  # top_p 0 is invalid: left out
    assert checkpoint_defaults(gguf, GGUF_KEYS) == {"temperature": 0.6, "top_k": 20}
    hf = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
    assert checkpoint_defaults(hf, HF_KEYS) == {"temperature": 0.7, "top_p": 0.8,
                                                "repetition_penalty": 1.05}
    assert checkpoint_defaults({"do_sample": False, "top_k": 5}, HF_KEYS) == {
        "top_k": 5, "temperature": 0.0}  # transformers would decode greedily
    values, sources = resolve({"temperature": 0.6, "top_k": 20}, temperature=0.0, min_p=None)
    assert values == {**FALLBACK, "temperature": 0.0, "top_k": 20}
    assert sources == {"temperature": "flag", "top_k": "checkpoint", "top_p": "default",
                       "min_p": "default", "repetition_penalty": "default"}
    with pytest.raises(TypeError, match="unknown sampling knobs"):
        resolve({}, temprature=1.0)


def test_generate_samples_by_default_and_temperature_0_is_greedy(capsys, smollm2, monkeypatch):
    """Without sampling flags `generate` samples with the fallback defaults (SmolLM2's GGUF
    sets none) and says so in --json; --temperature 0 gives the greedy tokens."""
    import jaxinfer
    from jaxinfer.sampling import FALLBACK
    from jaxinfer.text import generate

    monkeypatch.setattr(jaxinfer, "load", lambda *a, **k: smollm2)
    args = ["generate", *BASE, "--chat", "--prompt", "Name a fruit.", "--max-new-tokens", "8",
            "--seed", "3", "--json"]
    outputs = {}
    for extra in ([], ["--temperature", "0"]):
        code, out, _ = run_cli(capsys, *args, *extra)
        assert code == 0
        outputs[bool(extra)] = data = json.loads(out)
        assert data["sampling"] == {**FALLBACK, "seed": 3, "presence_penalty": 0.0,
                                    "frequency_penalty": 0.0, "min_tokens": 0,
                                    **({"temperature": 0.0} if extra else {})}
        assert data["sampling_source"]["temperature"] == ("flag" if extra else "default")
        assert data["sampling_source"]["top_p"] == "default"
    sampled = generate(smollm2, "Name a fruit.", chat=True, max_new_tokens=8, seed=3, **FALLBACK)
    greedy = generate(smollm2, "Name a fruit.", chat=True, max_new_tokens=8, temperature=0.0)
    assert outputs[False]["outputs"][0]["token_ids"] == sampled[0].token_ids
    assert outputs[True]["outputs"][0]["token_ids"] == greedy[0].token_ids


def test_checkpoint_sampling_defaults_are_loaded_and_saved(tmp_path, monkeypatch):
    """A GGUF's general.sampling.* keys become the model's defaults; a saved (quantized)
    checkpoint keeps them in its generation_config.json."""
    from test_gguf import tiny_llama_gguf, tiny_llama_hf
    from test_startup import tiny_model_file

    import jaxinfer
    from jaxinfer.loading import save_quantized
    from jaxinfer.quant.recipes import quantize_model

    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))
    path = tiny_model_file(tmp_path)
    assert jaxinfer.load(path, progress=False).sampling_defaults == {}
    tokens = ["t", "0", "t0", *(f"x{i}" for i in range(37))]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["t 0"], "general.sampling.temp": 0.5,
            "general.sampling.top_k": 7, "general.sampling.min_p": 0.1}
    path = tiny_llama_gguf(tmp_path / "sampled.gguf", tiny_llama_hf(), extra_meta=meta)
    model = jaxinfer.load(path, progress=False)
    want = {"temperature": 0.5, "top_k": 7, "min_p": pytest.approx(0.1)}
    assert model.sampling_defaults == want
    saved = save_quantized(quantize_model(model, "int8"), tmp_path / "q8")
    assert jaxinfer.load(saved).sampling_defaults == want
