"""bench/overheads.py's pure parts: the quantile, the parsing of the download script's lines, and the headline rows
and notes that bench/all.py shows (goal met or not, parts left out). The measurements themselves need Docker and
run with `make bench-overheads`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from bench.overheads import Bench, MiB, headlines, notes, pct


def test_pct_is_nearest_rank() -> None:
    xs = [float(x) for x in range(100, 0, -1)]
    assert pct(xs, 0.95) == 95.0
    assert pct(xs, 0.5) == 50.0
    assert pct(xs, 1.0) == 100.0
    assert pct([3.0], 0.95) == 3.0


def bench(tmp_path: Path, size_mib: int = 2, warmup: int = 1, rounds: int = 1) -> Bench:
    args = argparse.Namespace(size_mib=size_mib, warmup=warmup, rounds=rounds)
    return Bench(tmp_path, {"agent": "a", "sidecar": "s"}, args)


def test_samples_skip_the_warmup_and_give_mib_per_second(tmp_path: Path) -> None:
    size = 2 * MiB
    out = "\n".join(
        [
            "noise",
            f"BENCH-DL 1 https 9.0 {size} 0.1 0.5 0.5",
            f"BENCH-DL 1 http 9.0 {size} 0.1 0.5 0.5",
            f"BENCH-DL 2 https 0.5 {size} 0.01 0.250 0.125",
            f"BENCH-DL 2 http 0.25 {size} 0.01 0.010 0.040",
        ]
    )
    samples = bench(tmp_path)._samples(out, "here")
    assert [(s["round"], s["proto"], s["mib_s"], s["curl_cpu_s"]) for s in samples] == [
        (2, "https", 4.0, 0.375),
        (2, "http", 8.0, 0.05),
    ]


def test_samples_refuse_a_short_or_missing_download(tmp_path: Path) -> None:
    b = bench(tmp_path)
    with pytest.raises(RuntimeError, match="1 of 4 downloads"):
        b._samples(f"BENCH-DL 1 https 1.0 {2 * MiB} 0.1 0 0", "here")
    lines = [
        f"BENCH-DL {i} {p} 1.0 {2 * MiB - (i == 2 and p == 'http')} 0.1 0 0" for i in (1, 2) for p in ("https", "http")
    ]
    with pytest.raises(RuntimeError, match="downloaded"):
        b._samples("\n".join(lines), "here")


def result(https_ratio: float, added_ms: float, frozen_s: float, succeeded: int) -> dict[str, Any]:
    side = {"direct_mib_s": [1.0], "proxied_mib_s": [1.0]}
    kill = {
        "case": "frozen",
        "bash": "sleep 600",
        "latency_s": frozen_s,
        "sigterm_after_s": 0.01,
        "signals": ["15", "9"],
        "sigkill_after_s": 5.0,
        "died_after_s": frozen_s - 0.1,
        "agent_exit_code": "137",
    }
    once = {
        "concurrency": 10,
        "exit_code": 0 if succeeded == 10 else 18,
        "succeeded": succeeded,
        "failed": [],
        "wall_s": 22.0,
        "run_median_s": 20.0,
        "run_max_s": 21.0,
        "peak_rss_mib": 65,
    }
    return {
        "throughput": {
            "size_mib": 256,
            "rounds": 5,
            "goal": 0.8,
            "server": "172.17.0.1 (host-gateway)",
            "https": {
                "ratio": https_ratio,
                "direct_mib_s": 500.0,
                "proxied_mib_s": 500.0 * https_ratio,
                "samples": side,
            },
            "http": {"ratio": 0.5, "direct_mib_s": 1600.0, "proxied_mib_s": 800.0, "samples": side},
            "proxied_run": {
                "wall_s": 8.0,
                "connections": 12,
                "bytes_down": 3 * 1024 * MiB,
                "sidecar_cpu_s": None,
                "proxy_mib_per_cpu_s": None,
            },
        },
        "ttfb": {
            "requests": 100,
            "body_bytes": 65536,
            "goal_ms": 5.0,
            "direct_ms": {"median": 0.5, "p95": 1.0},
            "gateway_ms": {"median": 0.5 + added_ms, "p95": 2.0},
            "added_ms": {"median": added_ms, "p95": 1.0},
            "whole_response_ms": {"direct": 0.6, "gateway": 1.5},
        },
        "kill": {"kill_after_s": 8, "grace_s": 5.0, "goal_s": 7.0, "agent_frozen": kill},
        "sweep": {"runs": 10, "cores": 2, "at_once": once},
    }


def test_headlines_mark_each_goal() -> None:
    met = headlines(result(0.9, 1.0, 5.2, 10))
    assert [row.rsplit("|", 2)[-2].strip() for row in met] == ["yes", "", "yes", "yes", "yes", "", ""]
    missed = headlines(result(0.5, 6.0, 7.5, 9))
    assert [row.rsplit("|", 2)[-2].strip() for row in missed] == ["**no**", "", "**no**", "**no**", "**no**", "", ""]
    assert "**9/10 succeeded**" in missed[4]


def test_parts_left_out_give_no_rows_and_notes_read_every_part() -> None:
    assert headlines({}) == [] and notes({}) == []
    res = result(0.9, 1.0, 5.2, 10)
    res["kill"]["agent_frozen"]["sigkill_after_s"] = None
    text = "\n".join(notes(res))
    assert "SIGKILL after none" in text
    assert "3072 MiB through the proxy" in text
    assert "10 at a time: wall 22.0 s" in text
