"""Benchmarks of blockdpr and blockdpr_kernels, one job per module.

shapes       the one table of benchmark layers
roofline     the performance model (predicted time, speedup ceiling)
aot          ahead-of-time compile report of the Triton kernels (no GPU needed; aot_worker compiles)
timing       one timer: triton.testing.do_bench on CUDA, perf_counter on the CPU smoke path
check        every timed block-sparse case first checked against the dense op
throughput   the benchmark CLI: flags, presets, work items, run; layers (one layer shape against its
             peers), training (training steps), report (targets, tables, plots, markdown)
breakdown    per-kernel times of the target shapes, cuDNN's passes, torch.profiler's top kernels
memory       bytes of parameters + gradients + optimizer state, dense against block mode
host         host cost per layer call without a GPU: Triton's launch path over a do-nothing CUDA driver
autotune_cache  tuned kernel configs saved per GPU name and loaded before timing
narrow_autotune  pytest plugin: one config per kernel, for bounded GPU test runs
session      what bench/gpu_session.sh runs: bounded steps, summary.json
readme       the top-level README's GPU results table, regenerated from a session's JSON

Run a module as ``python -m bench.<module>`` (or ``python bench/<module>.py``) from the repository root.
"""
