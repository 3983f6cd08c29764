"""The command-line tools: `cli` (the `llama-fast` command: generate, convert, bench), `demo` (the embedded
demo model, converted once and cached), `convert` (GGUF -> HF directory), `bench` (the end-to-end generate
benchmark harness) and `bench_plot` (its chart). Library code never imports these."""
