"""Predicted cost of one case: record its launches, read each, apply the model."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import model
from .analyze import LaunchReport, analyze
from .cases import Shape
from .record import record


@dataclasses.dataclass
class LaunchCost:
    report: LaunchReport
    resident: int  # programs per SM at once
    time: model.LaunchTime


@dataclasses.dataclass
class CaseCost:
    shape: Shape
    direction: str  # "fwd" | "bwd"
    impl: str  # what was asked: "auto" or a variant name
    variant: str  # what ran
    config: Optional[dict]
    launches: list[LaunchCost]
    glue_kernels: int  # torch kernels the launcher runs besides the Triton launches
    efficiency: float
    dtype_bytes: int = 2

    @property
    def warp_instructions(self) -> float:
        return sum(c.report.warp_instructions for c in self.launches)

    @property
    def taps(self) -> int:
        s = self.shape
        return s.B * s.H * s.W * s.heads * s.k * s.k

    @property
    def instructions_per_tap(self) -> float:
        """Dynamic warp instructions per (pixel, head, window tap)."""
        return self.warp_instructions / self.taps

    @property
    def predicted_us(self) -> float:
        return sum(c.time.total_us for c in self.launches) + model.glue_us(self.glue_kernels)

    @property
    def floor_us(self) -> float:
        s = self.shape
        return model.io_floor_us(s.B, s.H, s.W, s.C, self.dtype_bytes)

    @property
    def ratio_to_floor(self) -> float:
        return self.predicted_us / self.floor_us

    def bound_time(self, kind: str) -> float:
        attr = {"issue": "issue_us", "L2": "l2_us", "HBM": "hbm_us"}[kind]
        return sum(getattr(c.time, attr) for c in self.launches)

    @property
    def bound(self) -> str:
        """The bound that binds for most of the predicted time (summed over launches)."""
        if not self.launches:
            return ""
        share = {}
        for c in self.launches:
            t = max(c.time.issue_us, c.time.l2_us, c.time.hbm_us)
            share[c.time.bound] = share.get(c.time.bound, 0.0) + t
        return max(share.items(), key=lambda kv: kv[1])[0]

    @property
    def notes(self) -> str:
        return "; ".join(sorted({c.report.note for c in self.launches if c.report.note}))


def _time(rep: LaunchReport, resident: int, efficiency: float) -> model.LaunchTime:
    return model.launch_time(rep.warp_instructions_per_program, rep.programs, rep.num_warps,
                             resident, rep.l2_bytes, rep.hbm_bytes, efficiency)


def retime(case: CaseCost, efficiency: float) -> CaseCost:
    """The same case under another issue efficiency (nothing is recompiled)."""
    launches = [LaunchCost(c.report, c.resident, _time(c.report, c.resident, efficiency))
                for c in case.launches]
    return dataclasses.replace(case, launches=launches, efficiency=efficiency)


def predict_case(shape: Shape, direction: str, impl: str, efficiency: float, arch: int = 90,
                 dtype=torch.bfloat16) -> CaseCost:
    """Raises ValueError when a forced variant does not support the case."""
    rec = record(shape, direction, impl, dtype)
    costs = []
    for launch in rec.launches:
        rep = analyze(launch, arch)
        resident = model.resident_programs(rep.num_warps, rep.regs, rep.shared)
        costs.append(LaunchCost(rep, resident, _time(rep, resident, efficiency)))
    return CaseCost(shape, direction, impl, rec.impl, rec.config, costs, len(rec.glue_ops),
                    efficiency, torch.empty(0, dtype=dtype).element_size())
