"""Loading one tensor-parallel rank's shard: llama_fast.loading calls this module's `ShardedLoad` at the
points where a one-process load builds the model, reads a tensor and finishes.

Each rank reads only its part of each tensor (layout.Split -> byte ranges of the file): safetensors
rectangles (SafetensorsFile.read_rectangle), llama_fast's quantized format part by part (codes, scales and
offsets of whole groups), GPTQ / AWQ / compressed-tensors parts still packed, in whole words and groups (each
reader's shard_axes), GGUF rows / whole blocks (formats.gguf). The norms, the row-parallel biases and,
with vocab="replicated", the embedding and lm_head are read whole by every rank.

A failure on any rank (a bad layout, a file error, a shard boundary that would split a quantization group)
becomes an error on every rank: the ranks exchange their outcome once before anything runs collectively, so
no rank waits forever for one that gave up. The same exchange compares what each rank loaded (the shapes the
collectives depend on, and the dtype): ranks given different models fail there, not in a mismatched
all-reduce.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import time

import torch
import torch.distributed as dist

from llama_fast.formats.regions import SplitsBlockError
from llama_fast.formats.safetensors import SafetensorsFile
from llama_fast.parallel import runtime
from llama_fast.parallel.layout import VOCAB_MODES, TensorParallelError, TensorParallelLayout

TP_PLANS = ("auto",)
_MESSAGE_BYTES = 1024
_FINGERPRINT_BYTES = 32      # sha256
_EXIT_GRACE_S = 0.05         # GIL released at exit for gloo's threads (_let_collectives_finish_at_exit)
_exit_registered = False


def _register_exit(own_group: bool) -> None:
    """One exit handler per process (a second load in the same process registers none)."""
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_let_collectives_finish_at_exit, own_group)


def _let_collectives_finish_at_exit(own_group: bool) -> None:
    """At interpreter exit, while it is still whole: gloo's worker threads drop a finished collective's tensors
    after the caller's wait returned, and dropping a tensor that has a Python object takes the GIL. A main thread
    that runs on to interpreter teardown without letting go of the GIL leaves such a drop for teardown, where
    taking the GIL ends the worker thread and the process with `terminate called without an active exception`
    (SIGABRT; seen about 1 run in 12 of `llama-fast generate --tp 2` on a 2-core machine, core dump:
    ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> decref -> take_gil -> pthread_exit; pytorch issue
    190489). Sleeping releases the GIL so those drops finish; then the process group this module started (under
    torchrun nobody else owns it) is destroyed."""
    time.sleep(_EXIT_GRACE_S)
    if own_group and dist.is_initialized():
        dist.destroy_process_group()


class ShardedLoad:
    """One rank's load: `start` (the process group, the device), then loading.py's calls, then `run`."""

    def __init__(self, group, device: torch.device, vocab: str):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.device, self.vocab = device, vocab
        self.layout: TensorParallelLayout | None = None

    @classmethod
    def start(cls, tp_plan, group=None, vocab: str = "sharded", device="cpu") -> "ShardedLoad":
        """Checks the arguments and joins the process group: the caller's, the default one, or (under
        torchrun, none initialized yet) a new one from the environment, gloo on CPUs and NCCL on GPUs. A GPU
        rank takes the device LOCAL_RANK."""
        if tp_plan not in TP_PLANS:
            raise TensorParallelError(f"tp_plan must be one of {TP_PLANS} (llama_fast shards every Llama layer its "
                                      f"own way), got {tp_plan!r}")
        if vocab not in VOCAB_MODES:
            raise TensorParallelError(f"tp_vocab must be one of {VOCAB_MODES}, got {vocab!r}")
        device = torch.device(device)
        if group is None:
            if not dist.is_initialized():
                if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                    raise TensorParallelError(
                        "tp_plan='auto' needs a torch.distributed process group: run under torchrun (which sets "
                        "RANK and WORLD_SIZE) or call torch.distributed.init_process_group first")
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                _register_exit(own_group=True)
            group = dist.group.WORLD
        _register_exit(own_group=False)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank(group))))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return cls(group, device, vocab)

    # ---- the calls llama_fast.loading makes ----

    def meta_model(self, cls, config, dtype: torch.dtype):
        """This rank's model on the meta device (raises TensorParallelError for a layout that cannot be split)."""
        self.layout = TensorParallelLayout(config, self.world, self.rank, self.vocab)
        return runtime.shard_meta_model(cls, self.layout, dtype)

    def group_basis(self, model) -> dict[str, int]:
        return runtime.row_parallel_input_sizes(model, self.layout)

    def split(self, name: str):
        return self.layout.split(name)

    def read_dense(self, st: SafetensorsFile, name: str) -> torch.Tensor:
        """This rank's part of a dense tensor (the whole tensor when the layout does not split it)."""
        split = self.split(name)
        if split is None:
            return st.read(name)
        if split.dim == 0:
            return st.read_rectangle(name, rows=(split.start, split.stop))
        return st.read_rectangle(name, cols=(split.start, split.stop))

    def read_quantized(self, base: str, handles: dict[str, tuple[SafetensorsFile, str]],
                       reader=None) -> dict[str, torch.Tensor]:
        """This rank's part of each stored part of a quantized linear: by the checkpoint format's reader
        (GPTQ, AWQ, compressed-tensors: `read_packed`), else in llama_fast's own format (`read_own_format`)."""
        if hasattr(reader, "shard_axes"):
            return self.read_packed(base, handles, reader)
        return self.read_own_format(base, handles)

    def read_packed(self, base: str, handles: dict[str, tuple[SafetensorsFile, str]],
                    reader) -> dict[str, torch.Tensor]:
        """This rank's slice of each part of a GPTQ / AWQ / compressed-tensors linear, still packed: along the
        stored dimension where the split weight dimension runs in that part (reader.shard_axes), in whole
        words and whole groups (a boundary inside one is an error naming the tensor); then reader.localize
        mends what slicing leaves stale (a stored shape; a group index, refused for act-order row splits)."""
        split = self.split(f"{base}.weight")
        if split is None:
            return {part: st.read(name) for part, (st, name) in handles.items()}
        out = {}
        for part, (st, name) in handles.items():
            axis = reader.shard_axes(base, part, st.dtype(name))[split.dim]
            span = (split.start, split.stop)
            try:
                if axis is None:
                    out[part] = st.read(name)
                elif axis.dim == 0:
                    out[part] = st.read_rectangle(name, rows=span, weights_per_row=axis.per)
                else:
                    out[part] = st.read_rectangle(name, cols=span, weights_per_element=axis.per)
            except SplitsBlockError as e:
                what = "input columns" if split.dim else "output rows"
                raise TensorParallelError(f"{e} (a packed word or quantization group; {base} split by {what} over "
                                          f"{self.world} ranks)") from None
        try:
            reader.localize(base, out, split.dim, split.size)
        except ValueError as e:
            raise TensorParallelError(str(e)) from None
        return out

    def read_own_format(self, base: str, handles: dict[str, tuple[SafetensorsFile, str]]) -> dict[str, torch.Tensor]:
        """This rank's part of each stored part of a linear in llama_fast's quantized format (llama_fast.quant):
        output rows of every part, or input columns counted in weights: two per byte of int4 codes, a group
        per scale / offset column (a boundary inside a group is an error naming it)."""
        split = self.split(f"{base}.weight")
        if "qweight" not in handles or "scales" not in handles or split is None:
            return {part: st.read(name) for part, (st, name) in handles.items()}
        codes_st, codes_name = handles["qweight"]
        per_code = 2 if codes_st.dtype(codes_name) == torch.uint8 else 1
        k = codes_st.shape(codes_name)[-1] * per_code
        scales_st, scales_name = handles["scales"]
        groups = scales_st.shape(scales_name)[-1]
        if groups <= 0 or k % groups:
            return {part: st.read(name) for part, (st, name) in handles.items()}   # QuantizedWeight says why
        group_size = k // groups
        if split.dim == 1 and "input_perm" in handles:
            raise TensorParallelError(f"{base}: act-order weights (input_perm) permute the input columns across "
                                      "the whole layer, so a row-parallel layer cannot be split by columns")
        out = {}
        for part, (st, name) in handles.items():
            if part == "input_perm":
                out[part] = st.read(name)        # [K]: the input features, whole on every rank
            elif split.dim == 0:
                out[part] = st.read_rectangle(name, rows=(split.start, split.stop))
            else:
                per = per_code if part == "qweight" else group_size
                try:
                    out[part] = st.read_rectangle(name, cols=(split.start, split.stop), weights_per_element=per)
                except SplitsBlockError as e:
                    raise TensorParallelError(f"{e} (a quantization group of {group_size} weights; "
                                              f"{base} has K={k} over {self.world} ranks)") from None
        return out

    # ---- the end ----

    def run(self, load):
        """model = load(); then every rank learns whether every rank succeeded, and the collectives are
        installed. An error anywhere is raised on every rank: its own, or one naming the rank that failed."""
        if self.device.type == "cpu":
            runtime.limit_threads(self.world)
        model, error = None, None
        try:
            model = load()
        except Exception as e:     # re-raised below, after telling the other ranks
            error = e
        failures, fingerprints = self._exchange_outcome(error, None if model is None else self._fingerprint(model))
        if error is not None:
            raise error
        if failures:
            rank, message = failures[0]
            raise TensorParallelError(f"rank {rank} of {self.world} failed to load its shard: {message}")
        if len(set(fingerprints)) != 1:
            differ = [r for r, f in enumerate(fingerprints) if f != fingerprints[self.rank]]
            raise TensorParallelError(f"rank {self.rank} and rank(s) {differ} loaded different models (sizes, "
                                      "layers, vocabulary mode or dtype differ): every rank must load the same one")
        runtime.attach(model, self.layout, self.group)
        return model

    def _fingerprint(self, model) -> bytes:
        """What the collectives' shapes and the ranks' agreement depend on, hashed."""
        c = self.layout.config
        what = (c.hidden_size, c.vocab_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim, c.intermediate_size, self.layout.vocab, str(model.dtype))
        return hashlib.sha256(repr(what).encode()).digest()

    def _exchange_outcome(self, error: Exception | None,
                          fingerprint: bytes | None) -> tuple[list[tuple[int, str]], list[bytes]]:
        """([(rank, message)] of the ranks that failed, every rank's fingerprint), the same on every rank (one
        all-gather of a fixed-size byte record: no pickling)."""
        device = self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        record = torch.zeros(_MESSAGE_BYTES + _FINGERPRINT_BYTES, dtype=torch.uint8)
        if fingerprint is not None:
            record[_MESSAGE_BYTES:] = torch.frombuffer(bytearray(fingerprint), dtype=torch.uint8)
        if error is not None:
            text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES - 3]
            record[0] = 1
            record[1], record[2] = len(text) % 256, len(text) // 256
            record[3:3 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        record = record.to(device)
        records = [torch.empty_like(record) for _ in range(self.world)]
        dist.all_gather(records, record, group=self.group)
        failures, fingerprints = [], []
        for rank, r in enumerate(records):
            r = r.cpu()
            if int(r[0]):
                n = int(r[1]) + 256 * int(r[2])
                failures.append((rank, bytes(r[3:3 + n].tolist()).decode("utf-8", "replace")))
            fingerprints.append(bytes(r[_MESSAGE_BYTES:].tolist()))
        return failures, fingerprints
