"""bench/output.py writes its JSON, Markdown and PNG files (matplotlib, file backend); the load
benchmarks keep their samples in a raw file apart and draw their files again from it."""

import json

from bench import failure, gateway, loadgen, output, sweep


def test_outputs_are_json_markdown_and_png(tmp_path):
    j, md = output.write(tmp_path / "r.json", {"a": 1}, "| x |\n")
    assert json.loads(j.read_text()) == {"a": 1} and md.read_text() == "| x |\n" and md.name == "r.md"
    cdf = output.plot_cdf(tmp_path / "cdf.png", {"1 req/s": [0.01, 0.02, 0.5], "empty": []}, "t", "ms")
    line = output.plot_timeline(tmp_path / "t.png", [(0.5, 0.05, True), (1.0, 2.0, False)],
                                [(0.8, "SIGKILL"), (0.9, "DEGRADED")], "t")
    for png in (cdf, line):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert output.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_results_keep_the_figures_and_the_raw_file_every_sample(tmp_path):
    result = {"config": {"rate": 1}, "runs": [{"rate": 1, "report": {"p50": 0.1}, "samples": [{"latency": 0.1}]}],
              "drain": {"lost": 0, "samples": [{"latency": 0.2}]}}
    j, md, raw = output.write_results(tmp_path / "r.json", result, "| x |\n")
    assert raw == tmp_path / "raw" / "r.json.gz" and md.read_text() == "| x |\n"
    assert output.read_raw(raw) == result
    assert json.loads(j.read_text()) == {"config": {"rate": 1}, "runs": [{"rate": 1, "report": {"p50": 0.1}}],
                                         "drain": {"lost": 0}, "raw_samples": "raw/r.json.gz"}
    first = raw.read_bytes()
    output.write_results(tmp_path / "r.json", result, "| x |\n")
    assert raw.read_bytes() == first  # no timestamp inside: a rerun of the same result changes nothing


def _samples(n, target=lambda i: "gateway"):
    return [loadgen.Sample(target(i), i * 0.25, 0.001, 200 if i % 7 else 503, latency=0.02 + 0.001 * i,
                           ttft=0.01, itl=[0.002] * 3, tokens=4) for i in range(n)]


def _replots_the_same_files(tmp_path, module, result, pngs):
    """The run's files, then the same files again from its raw file alone, elsewhere."""
    first, again = tmp_path / "run", tmp_path / "again"
    assert module.write_files(result, first / "b.json") == 0
    raw = first / "raw" / "b.json.gz"
    assert module.main(["--replot", str(raw), "--out", str(again / "b.json")]) == 0
    assert not (again / "raw").exists()  # the raw file is read, not copied
    for name in ["b.md", *pngs]:
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    summary, replotted = json.loads((first / "b.json").read_text()), json.loads((again / "b.json").read_text())
    assert '"samples":' not in json.dumps(summary)
    assert replotted == {**summary, "raw_samples": "../run/raw/b.json.gz"}
    return summary


def test_the_sweep_replots_from_its_raw_file(tmp_path):
    runs = []
    for rate in (2, 4):
        samples = _samples(8 * rate)
        runs.append({"rate": rate, "report": loadgen.report(samples, 4.0, rate),
                     "samples": loadgen.samples_json(samples)})
    result = {"config": {"max_tokens": 4, "duration": 4.0}, "environment": {}, "runs": runs,
              "saturation": sweep.saturation(runs)}
    summary = _replots_the_same_files(tmp_path, sweep, result, ["b-cdf.png"])
    assert [r["report"]["latency_s"]["p99"] for r in summary["runs"]] == \
        [r["report"]["latency_s"]["p99"] for r in runs]


def test_the_gateway_benchmark_replots_from_its_raw_file(tmp_path):
    samples = _samples(40, lambda i: "direct" if i % 2 == 0 else "gateway")
    per = {t: loadgen.report([s for s in samples if s.target == t], 10.0, 2.0) for t in ("direct", "gateway")}
    result = {"config": {"rate": 4.0, "duration": 10.0, "max_tokens": 4}, "environment": {}, "per_target": per,
              "added_ms": {m: {q: 1.0 for q in ("p50", "p95", "p99")} for m in ("latency_s", "ttft_s")},
              "samples": loadgen.samples_json(samples)}
    _replots_the_same_files(tmp_path, gateway, result, ["b-cdf.png"])


def test_the_failure_benchmark_replots_from_its_raw_file(tmp_path):
    samples = loadgen.samples_json(_samples(40))
    table = {"sent": 40, "ok": 34, **loadgen.summary([0.02, 0.03])}
    cycle = {"preset": "controller", "marks": {"kill": 2.0, "degraded": 3.0, "ray_node_dead": None,
                                               "new_worker_started": 5.0, "serving_again": 8.0},
             "kill_to_degraded_s": 1.0, "kill_to_ray_node_dead_s": None, "new_worker_to_serving_s": 3.0,
             "requests": 40, "failed": {"in_flight_at_kill": 1, "sent_before_detection": 2, "sent_after_detection": 0},
             "failure_kinds": ["503: no replica"], "latency": {"before": table, "during": table, "after": table},
             "timeline": [[0.0, "SERVING", 2], [3.0, "DEGRADED", 2]], "samples": samples}
    result = {"config": {"rate": 4.0, "max_tokens": 4}, "environment": {},
              "presets": {"controller": {"cycles": [cycle]}},
              "summary": {"kill_to_degraded_s_median": 1.0, "controller_kills": 1, "ray_node_dead_s_median": None,
                          "ray_default_node_dead_s_median": None}}
    summary = _replots_the_same_files(tmp_path, failure, result, ["b-controller-kill1.png"])
    assert summary["presets"]["controller"]["cycles"][0]["latency"]["during"] == table
