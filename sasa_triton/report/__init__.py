"""The benchmark report: `python -m sasa_triton.report [--suite quick|resnet50|...]`.

Times `sasa_triton.attend` (dispatched, and each backend), the unfold SASA port,
FlexAttention (CUDA), the cuDNN convolutions the layer replaces and the whole layer
(SASA2d vs nn.Conv2d), forward and forward + backward, with the memory floor measured in
the same run; writes `reports/<gpu>/results.csv`, charts and summary.md.

Files: impls (what is compared), baselines (unfold port, convs), flex (FlexAttention),
timing + memory (latency, peak memory, copy bandwidth), runner (the loop), results_csv
(the CSV and its columns, documented there), charts, markdown (summary.md), output,
__main__ (the CLI), host (`--suite host`: the host time of one call, docs/host.md); the
shapes are sasa_triton.perf_suite's. pandas and matplotlib are imported only inside this
package.
"""
