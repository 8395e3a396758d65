"""bench.host at tiny repeat counts: the real Triton launch path over the do-nothing CUDA driver runs, and
its JSON and README table have the expected shape (not the speed: that is the benchmark's job)."""
import json
import shutil

import pytest

from bench import host

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None,
                                reason="gcc is not installed: bench.host compiles its do-nothing CUDA driver with it")


def test_host_bench_json_and_table(tmp_path):
    out, readme = tmp_path / "host.json", tmp_path / "README.md"
    readme.write_text(f"intro\n{host.START}\nstale table\n{host.END}\nafter\n")
    host.main(["--calls", "2", "--repeats", "2", "--out", str(out), "--readme", str(readme)])
    record = json.loads(out.read_text())

    assert record["provenance"]["command"].endswith("-m bench.host --calls 2 --repeats 2 --out "
                                                    f"{out} --readme {readme}")
    assert set(record["provenance"]) >= {"git", "versions", "device", "time_utc"}
    assert record["device"]["target"] == "cuda sm_90"  # triton's own driver, over the stub
    assert record["device"]["properties"]["multiprocessor_count"] == 132
    cases = [(r["name"], r["tensors"]) for r in record["rows"] if r["mode"] == "fwd+bwd"]
    assert cases == [("block_sparse_conv2d", host.SPARSE), ("F.conv2d", "meta"), ("F.conv2d", "cpu, tiny"),
                     ("block_sparse_linear", host.SPARSE), ("F.linear", "meta"), ("F.linear", "cpu, tiny")]
    assert len(record["rows"]) == 12  # each case fwd+bwd and fwd
    for row in record["rows"]:
        assert len(row["repeats_us"]) == 2 and row["host_us"] == min(row["repeats_us"]) > 0

    # once tuned, a call launches without the autotuner; a new key tunes once per kernel, then not again
    assert record["tuner_runs_timed"] == 0
    assert record["new_key"]["tuner_runs_first_call"] == {"fwd": 1, "dgrad": 1, "wgrad": 1}
    assert record["new_key"]["tuner_runs_second_call"] == {"fwd": 0, "dgrad": 0, "wgrad": 0}
    assert all(n >= 2 for n in record["compiled_signatures"].values())

    ratios = {(r["op"], r["baseline"], r["mode"]): r for r in record["ratios"]}
    assert len(ratios) == 8
    targets = [r for r in record["ratios"] if r["target"] is not None]
    assert {(r["op"], r["baseline"], r["mode"]) for r in targets} == {("conv", "meta", "fwd+bwd"),
                                                                       ("linear", "meta", "fwd+bwd")}
    assert all(r["met"] == (r["ratio"] <= r["target"]) for r in targets)

    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{host.END}\nafter\n") and "stale table" not in text
    assert text.count("| `block_sparse_conv2d` (conv) |") == 1 and "<= 1.0x" in text
