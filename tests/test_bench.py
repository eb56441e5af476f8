"""`cinedit eval bench`: tokenizer frames/s and peak memory, each phase measured on its own."""

from __future__ import annotations

import json

from cinedit.cli import main


def test_tokenizer_bench_reports_speed_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["eval", "bench", "--preset", "debug", "--frames", "4", "--size", "32", "--repeats", "1", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shape"] == [1, 3, 4, 32, 32] and res["params_m"] == 1.2
    for phase in ("encode", "decode"):
        assert res[phase]["frames_per_s"] > 0 and res[phase]["peak_mb"] >= 0
    assert "frames/s" in capsys.readouterr().out
