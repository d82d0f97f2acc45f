"""bench/output.py writes its JSON, Markdown and PNG files (matplotlib, file backend)."""

import json

from bench import output


def test_outputs_are_json_markdown_and_png(tmp_path):
    j, md = output.write(tmp_path / "r.json", {"a": 1}, "| x |\n")
    assert json.loads(j.read_text()) == {"a": 1} and md.read_text() == "| x |\n" and md.name == "r.md"
    cdf = output.plot_cdf(tmp_path / "cdf.png", {"1 req/s": [0.01, 0.02, 0.5], "empty": []}, "t", "ms")
    line = output.plot_timeline(tmp_path / "t.png", [(0.5, 0.05, True), (1.0, 2.0, False)],
                                [(0.8, "SIGKILL"), (0.9, "DEGRADED")], "t")
    for png in (cdf, line):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert output.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n"
