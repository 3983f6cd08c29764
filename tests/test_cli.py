"""The llama-fast command: generate on a tiny model (streamed text, tokens/s), convert, and one-line
errors with a non-zero exit for user mistakes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import llama_fast
from llama_fast.tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               **(env or {}))
    return subprocess.run([sys.executable, "-m", "llama_fast", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_cli_model(tmp_path_factory.mktemp("tiny"))


def save_tiny_cli_model(path):
    """A tiny random model with a word-level tokenizer and a chat template, as an HF directory at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "user", "assistant", "hello"] + [f"w{i}" for i in range(58)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}"}))
    torch.manual_seed(0)
    config = llama_fast.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    eos_token_id=2)
    llama_fast.LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("mode", [["--prompt", "hello w1 w2"], ["--chat", "hello"]])
def test_generate_streams_text_and_reports_speed(tiny_dir, mode, capsys):
    rc = main(["generate", "--model", str(tiny_dir), *mode, "--max-new-tokens", "6", "--temperature", "0.8",
               "--seed", "0"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.strip(), "no generated text was printed"
    assert "prefill:" in err and "decode:" in err and "tokens/s" in err


def test_generate_is_reproducible_with_a_seed(tiny_dir, capsys):
    texts = []
    for _ in range(2):
        main(["generate", "--model", str(tiny_dir), "--prompt", "w3", "--max-new-tokens", "8",
              "--temperature", "1.0", "--seed", "7"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_module_entry_point_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "generate" in proc.stdout and "convert" in proc.stdout


def test_missing_model_is_one_line(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "no such model")


def test_bad_option_is_one_line():
    assert_one_line_error(run_cli("generate", "--max-new-tokens", "0"), "positive integer")
    assert_one_line_error(run_cli("generate", "--dtype", "float8"), "invalid choice")


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                           ("--temperature", "-1"), ("--top-p", "nan"), ("--top-p", "0"),
                                           ("--top-k", "-3"), ("--max-new-tokens", "2.5")])
def test_non_finite_or_out_of_range_sampling_options_are_refused(option, value):
    """Was: --temperature nan silently ran greedy."""
    assert_one_line_error(run_cli("generate", option, value), option)


def test_corrupt_gguf_is_one_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2 ** 40).to_bytes(8, "little") * 2 + b"\0" * 64)
    assert_one_line_error(run_cli("generate", "--model", str(bad), "--prompt", "x"), "bad.gguf", "truncated or corrupt")
    proc = run_cli("generate", "--model", str(bad), "--prompt", "x", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "GGUFFormatError" in proc.stderr


def test_bad_model_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{broken")
    (tmp_path / "tokenizer.json").write_text("{broken")
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path), "--prompt", "x"), "error")


def test_convert_missing_gguf_is_one_line(tmp_path):
    assert_one_line_error(run_cli("convert", str(tmp_path / "x.gguf"), str(tmp_path / "out")), "no such GGUF")


def test_chat_without_template_is_one_line(tiny_dir, tmp_path, capsys):
    import shutil

    for name in os.listdir(tiny_dir):
        shutil.copy(tiny_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(tmp_path), "--chat", "hello"]) == 2
    assert "no chat template" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The embedded model converted once into a fresh cache (the GGUF loader comes from llama_fast.formats.gguf)."""

    from llama_fast.tools import demo

    try:
        demo.find_demo_gguf()
    except demo.DemoModelNotFound as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LLAMA_FAST_CACHE")
    os.environ["LLAMA_FAST_CACHE"] = str(root)
    try:
        yield demo.demo_model_dir(progress=False)
    finally:
        if old is None:
            del os.environ["LLAMA_FAST_CACHE"]
        else:
            os.environ["LLAMA_FAST_CACHE"] = old


@pytest.mark.slow
def test_demo_model_is_converted_once_and_cached(demo_cache):
    import time

    from llama_fast.tools import demo

    files = set(os.listdir(demo_cache))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in os.listdir(os.path.dirname(demo_cache)) if f.startswith(".convert-")]  # no leftovers
    start = time.perf_counter()
    assert demo.demo_model_dir(progress=False) == demo_cache       # cached: no second conversion
    assert time.perf_counter() - start < 1.0
    tok = llama_fast.AutoTokenizer.from_pretrained(demo_cache)
    from_gguf = llama_fast.AutoTokenizer.from_pretrained(demo.find_demo_gguf())
    chat = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(chat, tokenize=False) == from_gguf.apply_chat_template(chat, tokenize=False)
    assert tok.encode("Hello  world 😀") == from_gguf.encode("Hello  world 😀")
    model = llama_fast.LlamaForCausalLM.from_pretrained(demo_cache, dtype="float32")
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    # the default form keeps the file's Q4_1 layers and its Q8_0 table (lm_head) native
    assert model.model.layers[0].mlp.down_proj.bits == 4 and model.lm_head.bits == 8


@pytest.mark.slow
def test_demo_model_dense_form_holds_the_same_numbers(demo_cache):
    from llama_fast.tools import demo

    dense_dir = demo.demo_model_dir(progress=False, native=False)
    assert dense_dir != demo_cache
    native = llama_fast.LlamaForCausalLM.from_pretrained(demo_cache, dtype="float32")
    dense = llama_fast.LlamaForCausalLM.from_pretrained(dense_dir, dtype="float32")
    assert not dense.lm_head.quantized and dense.model.layers[0].mlp.down_proj.bits is None
    # Exact by construction: the dense form is the dequantization of the same codes (q * scale + offset in
    # fp32 of fp16 scales: exact products and one rounded add, the same ops in both).
    torch.testing.assert_close(native.model.layers[3].mlp.down_proj.quantized_weight().dequantize(torch.float32),
                               dense.model.layers[3].mlp.down_proj.weight, rtol=0, atol=0)
    ids = torch.tensor([[1, 504, 3458, 314, 4980, 30]])
    with torch.inference_mode():
        a, b = native(ids).logits, dense(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.slow
def test_generate_with_the_default_model(demo_cache, capsys):
    rc = main(["generate", "--chat", "What is the capital of France? Answer in one word.", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert rc == 0 and "Paris" in out
    assert "prefill:" in err and "decode:" in err


def test_bench_subcommand_forwards_its_arguments(capsys):
    assert main(["bench", "--engines", "nope", "--model", "unused"]) == 2
    assert "unknown engine 'nope'" in capsys.readouterr().err
