"""TEST-ONLY: let ColossalAI 0.5.0's ZeRO (LowLevelZeroPlugin, HybridParallelPlugin) run on CPU processes over gloo.

Call `patch_colossalai_for_cpu()` inside each spawned worker before building a booster. Library code never
carries these patches; on CUDA none of them is needed.

What ColossalAI 0.5.0 does on torch 2.13 (CPU, gloo), found while writing `tests/test_zero.py`:

- It imports (with --no-deps; its metadata pins torch<=2.5.1) in ~9 s a process: peft, transformers and
  bitsandbytes come in through `colossalai.booster`; bitsandbytes logs a warning about missing CPU kernels.
- `get_accelerator()` falls back to its `CpuAccelerator` without CUDA; the plugins then put the model on CPU.
- Breaks: `LowLevelZeroOptimizer._sanity_checks` asserts ``get_accelerator().name in ["cuda", "npu"]`` ("device
  is required"), the only hard refusal of CPU; HybridParallelPlugin's ZeRO optimizer inherits it. (A failed
  construction then prints an ignored AttributeError from `__del__`: `grad_handles` was never set.)
- Breaks: `CpuAccelerator.Stream`, `current_stream` and `stream` raise, but every `BucketStore` makes a comm
  stream when built, and `_run_reduction` enters ``get_accelerator().stream(current_stream())`` even without
  overlapping communication. (Overlap itself needs `Tensor.record_stream`; the library turns it off off CUDA.)
- gloo on torch 2.13 has every collective ZeRO uses (`reduce_scatter_tensor`, `all_gather_into_tensor`, fp32 and
  bf16); torch warns that both names are deprecated, and that DDP's `broadcast_buffers` is.
- Numerics: with the shim, ZeRO-1/2 on 2 processes match one process to ~5e-7 (losses, grad norms) in fp32. The
  grad norm is summed over shards in float32, so it differs from a one-process norm in the 8th digit.
- Both ZeRO plugins cast every floating input to bf16 in bf16 runs, timesteps and RoPE positions included.
- HybridParallelPlugin: "all_to_all" is the mode with a separate, innermost sp mesh axis (contiguous sp groups)
  and a ZeRO group over dp x sp; the mode must be passed explicitly (None reaches ShardConfig, which defaults to
  "split_gather" and asserts tp > 1). ShardFormer takes a `Policy` subclass with an empty `module_policy` for any
  nn.Module. Its ZeRO refuses precision "fp32" (an assert, on every device).
- ColossalAI's own optimizer checkpoints gather states to whole tensors (they reload under another process
  count) but never save the fp32 masters: loading rebuilds them from the working weights, inexact in bf16.
  `cinedit.runtime.checkpoint` writes its own format for that reason.
"""

from __future__ import annotations

from contextlib import nullcontext

_PATCHED = False


def patch_colossalai_for_cpu() -> None:
    """Monkeypatch ColossalAI so its ZeRO optimizer runs on CPU (idempotent; call in each worker process)."""
    global _PATCHED
    if _PATCHED:
        return
    from cinedit.runtime.booster import import_colossalai

    import_colossalai()  # the library's quiet import first: the modules below are then already loaded
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    def sanity_checks(self: LowLevelZeroOptimizer) -> None:
        # The original's second half, without its first line (the CUDA/NPU assert): one dtype for every param.
        for group in self.optim.param_groups:
            for p in group["params"]:
                if not getattr(p, "skip_zero_check", False) and p.dtype != self._dtype:
                    raise AssertionError(f"parameters are expected to have dtype {self._dtype}, got {p.dtype}")

    LowLevelZeroOptimizer._sanity_checks = sanity_checks
    # BucketStore.__init__ builds a comm stream it only uses with overlap_communication: a placeholder will do.
    CpuAccelerator.Stream = lambda self, *args, **kwargs: None
    # _run_reduction runs on "the current stream" even without overlap; on CPU there is just the one: no-ops.
    CpuAccelerator.current_stream = lambda self, *args, **kwargs: None
    CpuAccelerator.stream = lambda self, stream: nullcontext()
    _PATCHED = True
