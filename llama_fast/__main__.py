"""`python -m llama_fast ...` runs the `llama-fast` command (llama_fast.tools.cli)."""
import sys

from llama_fast.tools.cli import main

sys.exit(main())
