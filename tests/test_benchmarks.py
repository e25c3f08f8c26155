"""The serving benchmark runs end to end: `scripts/bench_serve.py` on a tiny workload, in a fresh
process, against the real app on 127.0.0.1 and the static-batch baseline.

The script itself checks that every request got the number of tokens it asked for (greedy,
ignore_eos); here its report must hold every mode with positive figures. Speed is not judged:
the benchmark's numbers go into docs/, not into tests.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_serve_reports_every_mode_on_a_tiny_workload(tmp_path):
    out = tmp_path / "serve.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--requests", "4", "--slots",
         "2", "--concurrency", "1", "2", "--max-len", "128", "--prompt-range", "8", "32",
         "--out-range", "4", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \|", report, re.MULTILINE)}
    expected = {"continuous, 1 client", "continuous, 2 clients", "continuous, burst",
                "continuous, burst, first come first served",
                "static batches of 2 (median of the pairs)"}
    assert expected <= set(rows), report
    for name in expected:
        tokens_per_s, requests_per_s = map(float, rows[name])
        assert tokens_per_s > 0 and requests_per_s > 0, (name, report)
    ratio = re.search(r"Continuous \(burst\) / static: ([\d.]+)x output tokens/s "
                      r"\(median over 2 pairs", report)
    assert ratio and float(ratio.group(1)) > 0, report
    assert "4 requests, prompts 8-32 tokens, outputs 4-8 tokens" in report
    short = re.search(r"Short requests' TTFT p99 / p50 in the bursts \(shortest first\): "
                      r"([\d.]+)x median over 3 bursts", report)
    assert short and float(short.group(1)) >= 1, report


def test_run_bench_prefills_more_prompt_tokens_than_one_step_takes():
    """`jaxinfer bench` at a batch whose prompts exceed one engine step's prefill budget (3 x 300
    tokens > MAX_CHUNK = 512): every prompt is prefilled before the decode is timed, and every
    row gets its tokens (run_bench checks the count)."""
    import jax

    import models
    from jaxinfer.bench import run_bench
    from jaxinfer.generate import MAX_CHUNK
    from jaxinfer.model import Model

    config = models.LlamaConfig.tiny()
    model = Model(config=config, params=models.init_params(config, jax.random.key(0)),
                  tokenizer=None, source="tiny", eos_token_ids=())
    assert 3 * 300 > MAX_CHUNK
    res = run_bench(model, batch_size=3, prompt_len=300, new_tokens=4)
    assert res["decode_tokens_per_s"] > 0 and res["ttft_s"] > 0
