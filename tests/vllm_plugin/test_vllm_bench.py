"""The vLLM benchmark's log parsing and summary, on a made-up log (the measurement itself needs
vLLM: ``python -m fastckpt.integrations.vllm.bench`` in the vLLM venv)."""

from __future__ import annotations

import json

import pytest

from fastckpt.integrations.vllm.bench import parse_round_log, summarise, to_markdown


def _mark(**kw: object) -> str:
    return "BENCH_MARK " + json.dumps(kw)


LOG = "\n".join(
    [
        "(MainProcess) INFO [default_loader.py:501] Loading weights took 0.90 seconds",
        _mark(warmup="safetensors", error=None),
        "(MainProcess) INFO [loader.py:69] Loading weights took 0.30 seconds (fastckpt, /m)",
        _mark(warmup="fastckpt", error=None),
        "INFO Loading weights took 0.50 seconds",
        "BENCH_TIMER 0.500001",
        _mark(name="safetensors", cache="warm", resident_bytes=10, error=None),
        "INFO Loading weights took 0.20 seconds (fastckpt, /m, engine=auto, verify=False)",
        "INFO fastckpt rank tp=1/2 pp=0/1 on cpu: read 300000000 bytes for 300000000 bytes of "
        "tensors (checkpoint 600000000 bytes) via page-cache-map",
        "INFO fastckpt rank tp=0/2 pp=0/1 on cpu: read 400000000 bytes for 300000000 bytes of "
        "tensors (checkpoint 600000000 bytes) via page-cache-map",
        "BENCH_TIMER 0.2",
        "BENCH_RSS 2000000000",
        _mark(name="fastckpt", cache="warm", resident_bytes=10, error=None, first_token_s=3.5),
        _mark(name="runai_streamer", cache="warm", resident_bytes=10, error="ValueError: no"),
        "BENCH_TIMER 0.7",
        _mark(name="safetensors", cache="warm", resident_bytes=10, error=None),
    ]
)


def test_parse_round_log_pairs_each_timer_with_its_load() -> None:
    samples = parse_round_log(LOG)
    assert [(s["name"], s["weights_s"], s["vllm_log_s"]) for s in samples] == [
        ("safetensors", 0.500001, 0.5),
        ("fastckpt", 0.2, 0.2),
        ("runai_streamer", None, None),
        ("safetensors", 0.7, None),
    ]
    assert samples[1]["read_nbytes"] == [400000000, 300000000]
    assert samples[0]["read_nbytes"] == [] and samples[3]["read_nbytes"] == []


def test_parse_round_log_refuses_a_load_without_timer() -> None:
    with pytest.raises(RuntimeError, match="no BENCH_TIMER line"):
        parse_round_log(_mark(name="fastckpt", cache="cold", resident_bytes=0, error=None))


def test_summary_and_markdown() -> None:
    loaders = [("safetensors", "stock"), ("fastckpt", "stock"), ("runai_streamer", "stock")]
    rows = summarise(parse_round_log(LOG), loaders, ("warm",), nbytes=10**9)
    assert rows[0]["median_s"] == pytest.approx(0.6) and rows[0]["n"] == 2
    assert rows[0]["min_s"] == 0.500001 and rows[0]["max_s"] == 0.7
    assert rows[1]["gbps"] == pytest.approx(5.0)
    assert rows[2] == {
        "loader": "runai_streamer",
        "files": "stock",
        "cache": "warm",
        "error": "ValueError: no",
    }
    text = to_markdown(
        {"machine": {"vllm": "0.32.0", "cpus": 2}, "model": {"nbytes": 10**9}, "rows": rows}
    )
    assert rows[1]["read_nbytes_per_rank"] == [400000000, 300000000]
    assert rows[1]["first_token_s"] == 3.5 and rows[1]["peak_rss_bytes"] == 2 * 10**9
    assert (
        "| fastckpt | stock | warm | 0.20 (0.20-0.20) | 3.00 | 5.00 | 3.5 | 2.00 | 0.40 / 0.30 "
        "| 1 |" in text
    )
    assert "failed: ValueError: no" in text
