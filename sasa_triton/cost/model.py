"""The cost model: H100 constants (with their sources) and predicted time of one launch.

    predicted = max(issue-bound, L2-bound, HBM-bound) + launch latency

* issue-bound: the busiest SM's warp instructions (ceil(programs / SMs) programs, all
  resident at once up to the occupancy limit) at min(4, resident warps) instructions per
  clock times one efficiency factor for everything a static count cannot see (dependency
  and memory stalls, bank conflicts, divergence). The factor starts at a stated,
  conservative value and changes only through `--calibrate` against GPU measurements
  (stored in calibration.json beside this file), never to make a kernel look better.
* L2-bound: bytes the SMs request from L2 (global loads and stores: dynamic instructions x
  32 lanes x access width, an upper bound: masked-off lanes and lanes sharing an address
  are counted) / L2 bandwidth.
* HBM-bound: unique bytes of the tensors a launch reads and writes / HBM bandwidth.
* launch latency: per Triton launch, and per torch glue kernel around them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")

# H100 SXM5 80GB HBM3 (the card of the project's measurements). One place; each with its source.
H100 = dict(
    name="H100 SXM5 80GB HBM3",
    sms=132,  # NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5: 132 SMs)
    clock_ghz=1.755,  # an assumed sustained SM clock under load (max boost 1.98 GHz,
                      # whitepaper); not measured: calibration absorbs the error
    issue_per_clock=4,  # warp instructions per SM per clock: 4 sub-partitions x 1 scheduler
                        # (whitepaper, SM diagram)
    hbm_gbps=2960.0,  # device-to-device copy measured on the card (bytes read + written,
                      # torch 2.11, the report's copy bandwidth); 3350 on the spec sheet
    l2_gbps=5500.0,  # L2 -> SM; no official figure: microbenchmarks of H100 report 5.5-7 TB/s,
                     # the low end is taken (A100 whitepaper: 5120 B/clock for A100)
    launch_us=3.0,  # GPU-side gap between back-to-back kernel launches, order of magnitude
                    # (typical 2-4 us); not measured on this card
    regs_per_sm=65536, max_warps_per_sm=64, max_programs_per_sm=32,  # sm_90 limits
    smem_per_sm=233472, smem_reserved_per_program=1024,  # 228 KB per SM, 1 KB per block
                                                         # (CUDA programming guide, cc 9.0)
)
DEFAULT_EFFICIENCY = 0.55  # conservative: the low end of 55-85% issue efficiency


@dataclasses.dataclass
class Calibration:
    efficiency: float
    calibrated: bool
    source: str  # where the factor came from

    def label(self) -> str:
        if self.calibrated:
            return f"calibrated (issue efficiency {self.efficiency:.3f} from {self.source})"
        return (f"UNCALIBRATED (issue efficiency {self.efficiency} is the stated default; no GPU "
                f"measurement has calibrated it: python -m sasa_triton.cost --calibrate BENCH_CSV)")


def load_calibration(path: Path = CALIBRATION_FILE) -> Calibration:
    if path.exists():
        data = json.loads(path.read_text())
        return Calibration(float(data["efficiency"]), True,
                           f"{data.get('bench_csv', '?')}, {data.get('cases', '?')} cases, "
                           f"{data.get('device', '?')}")
    return Calibration(DEFAULT_EFFICIENCY, False, "default")


def resident_programs(num_warps: int, regs: int, shared: int, gpu: dict = H100) -> int:
    """Programs an SM holds at once (registers, shared memory, warps, blocks)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp, 256 at a time
    by_regs = (gpu["regs_per_sm"] // regs_per_warp) // num_warps
    by_smem = gpu["smem_per_sm"] // (shared + gpu["smem_reserved_per_program"])
    by_warps = gpu["max_warps_per_sm"] // num_warps
    return max(0, min(by_regs, by_smem, by_warps, gpu["max_programs_per_sm"]))


@dataclasses.dataclass
class LaunchTime:
    issue_us: float
    l2_us: float
    hbm_us: float
    launch_us: float
    bound: str  # "issue" | "L2" | "HBM"

    @property
    def total_us(self) -> float:
        return max(self.issue_us, self.l2_us, self.hbm_us) + self.launch_us


def launch_time(warp_instructions_per_program: float, programs: int, num_warps: int,
                resident: int, l2_bytes: float, hbm_bytes: float, efficiency: float,
                gpu: dict = H100) -> LaunchTime:
    per_sm = math.ceil(programs / gpu["sms"])
    active_warps = min(per_sm, max(resident, 1)) * num_warps
    rate = min(gpu["issue_per_clock"], active_warps) * gpu["clock_ghz"] * 1e3 * efficiency
    issue = per_sm * warp_instructions_per_program / rate  # instructions / (per us)
    l2 = l2_bytes / (gpu["l2_gbps"] * 1e3)
    hbm = hbm_bytes / (gpu["hbm_gbps"] * 1e3)
    bound = max((issue, "issue"), (l2, "L2"), (hbm, "HBM"))[1]
    return LaunchTime(issue, l2, hbm, gpu["launch_us"], bound)


def io_floor_us(B: int, H: int, W: int, C: int, bytes_per_element: int,
                gpu: dict = H100) -> float:
    """The forward's memory floor: one read of q, k, v and one write of out."""
    return 4 * B * H * W * C * bytes_per_element / (gpu["hbm_gbps"] * 1e3)


def glue_us(kernels: int, gpu: dict = H100) -> float:
    """Torch kernels around the Triton launches: launch latency each (their bytes are small
    partial sums in these launchers)."""
    return kernels * gpu["launch_us"]

