"""tests/conftest.py's helpers (tiny models, the transformers comparison) for this directory, whose own
conftest.py shadows the module name `conftest`."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("llama_fast_tests_conftest",
                                               pathlib.Path(__file__).resolve().parents[1] / "conftest.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

assert_matches_transformers = _module.assert_matches_transformers
left_padded_batch = _module.left_padded_batch
make_hf_model = _module.make_hf_model
tiny_config = _module.tiny_config
