"""The seeded mutational fuzzer (tests/fuzz/fuzz_formats.py) over GGUF and safetensors headers, config.json and
tokenizer files: every case, loaded in a forked child under an address-space, CPU-time and wall-clock limit,
must load the same thing as the original (or a different valid value of a header field) or raise a
ValueError. 200 cases here; LLAMA_FAST_FUZZ_CASES=N (and LLAMA_FAST_FUZZ_SEED) for more."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mutated_files_load_equal_or_raise_a_value_error(tmp_path):
    cases = int(os.environ.get("LLAMA_FAST_FUZZ_CASES", "200"))
    seed = int(os.environ.get("LLAMA_FAST_FUZZ_SEED", "0"))
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz", "fuzz_formats.py"), "--cases", str(cases),
                           "--seed", str(seed), "--out", str(out), "--keep", str(tmp_path / "failing")],
                          capture_output=True, text=True, timeout=60 + 10 * cases)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps(report["counts"]))     # shown with -s: the counts per file kind and outcome
    assert sum(sum(c.values()) for c in report["counts"].values()) == cases
    assert not report["failures"], json.dumps(report["failures"][:5], indent=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The fuzzer must reach past the first checks: some cases of each kind load, most are refused.
    for kind, counts in report["counts"].items():
        assert counts.get("error", 0) > 0, (kind, counts)
