"""`python -m sasa_triton.cost`: the predicted GPU cost of attend's launches, on CPU.

The launches `attend` makes (dispatched, and each variant forced; forward and backward)
are recorded through the real host launchers, compiled for sm_90 by Triton's compiler
and ptxas, and their SASS is read into loops with instruction classes; dynamic totals,
traffic and a simple, stated time model (sasa_triton/cost/model.py) give a PREDICTED
time per case. Nothing runs on a GPU. See docs/PERF.md ("Predicted cost").

Files: record.py (launches), compile.py (sm_90 compile), sass.py (disassembly, loops),
classes.py (instruction classes), kernels.py (per-kernel trip counts), analyze.py (one
launch read), model.py (H100 constants, time), predict.py (one case), output.py (CSV,
markdown), calibrate.py (--calibrate), baseline.py (the instruction watch of the tests).
"""
