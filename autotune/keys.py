"""Tuning keys: which calls share one tuned (variant, config).

A `TuneKey` holds everything that changes which kernel is fastest except the batch and
the exact image size: the image size is bucketed to powers of two, so a 28 x 28 and a
30 x 30 map share an entry. `key_for` runs on every dispatched call, so it is plain
Python on shapes (about a microsecond).

A `TuneCase` is a concrete shape the tuner benchmarks for a key (the key plus B, H, W).

String forms (stable; used in JSON tables and on the command line):

    TuneKey   fwd-bf16-k7x7-dil1x1-heads8-d16-zeros-rel_shared-rpb0-H32xW32
    TuneCase  B=32,H=28,W=28,heads=8,d=16,k=7[,dil=1][,padding=zeros][,rel=shared][,rpb=0]
              (k and dil take "7" or "7x5"; direction and dtype come from the CLI flags)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from sasa_triton.types import DIRECTIONS, DTYPE_NAMES, DTYPES, PADDINGS

__all__ = ["DIRECTIONS", "DTYPES", "DTYPE_NAMES", "PADDINGS", "RELS", "TuneCase", "TuneKey",
           "key_for", "parse_case", "parse_cases", "size_bucket"]

RELS = ("none", "shared", "per_head")

# Image sides are bucketed to the next power of two, clamped to this range: maps smaller
# than 8 behave alike (one tile), and beyond 512 the kernels are in steady state.
MIN_BUCKET = 8
MAX_BUCKET = 512


def size_bucket(n: int) -> int:
    """Next power of two >= n, clamped to [MIN_BUCKET, MAX_BUCKET]."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    b = 1 << (n - 1).bit_length()
    return b if b < MAX_BUCKET else MAX_BUCKET


_EXAMPLE_KEY = "fwd-bf16-k7x7-dil1x1-heads8-d16-zeros-rel_shared-rpb0-H32xW32"


class TuneKey(NamedTuple):
    direction: str  # "fwd" | "bwd"
    kh: int
    kw: int
    dh: int
    dw: int
    heads: int
    d: int
    dtype: str  # "bf16" | "fp16" | "fp32" | "fp64"
    padding: str  # "zeros" | "mask" | "shift"
    rel: str  # "none" | "shared" | "per_head"
    rpb: bool
    h_bucket: int
    w_bucket: int

    def __str__(self) -> str:
        return (f"{self.direction}-{self.dtype}-k{self.kh}x{self.kw}-dil{self.dh}x{self.dw}"
                f"-heads{self.heads}-d{self.d}-{self.padding}-rel_{self.rel}-rpb{int(self.rpb)}"
                f"-H{self.h_bucket}xW{self.w_bucket}")

    @classmethod
    def parse(cls, text: str) -> TuneKey:
        """Inverse of str(key); ValueError naming the bad part otherwise."""
        try:
            direction, dtype, k, dil, heads, d, padding, rel, rpb, hw = text.split("-")
            kh, kw = _pair_of(k, "k")
            dh, dw = _pair_of(dil, "dil")
            hb, _, wb = hw.partition("x")
            if not rel.startswith("rel_"):
                raise ValueError(f"expected rel_<none|shared|per_head>, got {rel!r}")
            if rpb not in ("rpb0", "rpb1"):
                raise ValueError(f"expected rpb0 or rpb1, got {rpb!r}")
            key = cls(direction, kh, kw, dh, dw, _int_after(heads, "heads"), _int_after(d, "d"),
                      dtype, padding, rel[len("rel_"):], rpb == "rpb1",
                      _int_after(hb, "H"), _int_after(wb, "W"))
            key.check()
        except ValueError as e:
            raise ValueError(f"bad tune key {text!r} (expected e.g. '{_EXAMPLE_KEY}'): {e}"
                             ) from None
        return key

    def check(self) -> None:
        """ValueError naming the field that is out of range."""
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.rel not in RELS:
            raise ValueError(f"rel must be one of {RELS}, got {self.rel!r}")
        if not isinstance(self.rpb, bool):
            raise ValueError(f"rpb must be rpb0 or rpb1, got {self.rpb!r}")
        for name in ("kh", "kw", "dh", "dw", "heads", "d", "h_bucket", "w_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _int_after(text: str, prefix: str) -> int:
    if not text.startswith(prefix) or not text[len(prefix):].isdigit():
        raise ValueError(f"expected {prefix}<int>, got {text!r}")
    return int(text[len(prefix):])


def _pair_of(text: str, prefix: str) -> tuple[int, int]:
    body = text[len(prefix):] if text.startswith(prefix) else ""
    a, sep, b = body.partition("x")
    if not (a.isdigit() and sep and b.isdigit()):
        raise ValueError(f"expected {prefix}<int>x<int>, got {text!r}")
    return int(a), int(b)


def key_for(q: torch.Tensor, args, direction: str) -> TuneKey:
    """The key of one call (args: sasa_triton.args.AttendArgs). Plain Python on shapes."""
    _, H, W, heads, d = q.shape
    rel_h = args.rel_h
    rel = "none" if rel_h is None else ("shared" if rel_h.dim() == 2 else "per_head")
    return TuneKey(direction, args.kh, args.kw, args.dh, args.dw, heads, d,
                   DTYPE_NAMES[q.dtype], args.padding, rel, args.rpb is not None,
                   size_bucket(H), size_bucket(W))


class TuneCase(NamedTuple):
    """A concrete shape to benchmark; `key` is the entry it fills."""

    direction: str
    B: int
    H: int
    W: int
    heads: int
    d: int
    kh: int
    kw: int
    dh: int = 1
    dw: int = 1
    dtype: str = "bf16"
    padding: str = "zeros"
    rel: str = "shared"
    rpb: bool = False

    @property
    def q_shape(self) -> tuple:
        return (self.B, self.H, self.W, self.heads, self.d)

    @property
    def key(self) -> TuneKey:
        return TuneKey(self.direction, self.kh, self.kw, self.dh, self.dw, self.heads, self.d,
                       self.dtype, self.padding, self.rel, self.rpb,
                       size_bucket(self.H), size_bucket(self.W))

    def spec(self) -> str:
        """The compact command-line form (without direction and dtype)."""
        k = str(self.kh) if self.kh == self.kw else f"{self.kh}x{self.kw}"
        dil = str(self.dh) if self.dh == self.dw else f"{self.dh}x{self.dw}"
        return (f"B={self.B},H={self.H},W={self.W},heads={self.heads},d={self.d},k={k},"
                f"dil={dil},padding={self.padding},rel={self.rel},rpb={int(self.rpb)}")

    @classmethod
    def from_key(cls, key: TuneKey, B: int = 8) -> TuneCase:
        """A representative case of a key: the bucket's own size (its largest member)."""
        return cls(key.direction, B, key.h_bucket, key.w_bucket, key.heads,
                   key.d, key.kh, key.kw, key.dh, key.dw, key.dtype, key.padding, key.rel,
                   key.rpb)

    def with_(self, **changes) -> TuneCase:
        return self._replace(**changes)


CASE_FIELDS = ("B", "H", "W", "heads", "d", "k", "dil", "padding", "rel", "rpb")
CASE_REQUIRED = ("H", "W", "heads", "d", "k")
CASE_DEFAULTS = {"B": "32", "dil": "1", "padding": "zeros", "rel": "shared", "rpb": "0"}


def parse_cases(spec: str, directions=("fwd",), dtypes=("bf16",)) -> list[TuneCase]:
    """The cases of one command-line key: the compact form (see the module doc) gives one
    case per direction x dtype; a TuneKey string gives its own case (bucket size for H and
    W, B=8) whatever the directions and dtypes."""
    spec = spec.strip()
    if "=" not in spec:
        case = TuneCase.from_key(TuneKey.parse(spec))
        check_case(case)
        return [case]
    return [parse_case(spec, direction, dtype) for direction in directions for dtype in dtypes]


def parse_case(spec: str, direction: str = "fwd", dtype: str = "bf16") -> TuneCase:
    """Parses the compact form `B=32,H=28,W=28,heads=8,d=16,k=7` (see the module doc)."""
    spec = spec.strip()
    fields = dict(CASE_DEFAULTS)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in CASE_FIELDS:
            raise ValueError(f"bad item {item!r} in key {spec!r}: expected name=value with name "
                             f"in {CASE_FIELDS}")
        fields[name] = value.strip()
    missing = [f for f in CASE_REQUIRED if f not in fields]
    if missing:
        raise ValueError(f"key {spec!r} lacks {', '.join(missing)} (required: {CASE_REQUIRED})")
    try:
        kh, _, kw = fields["k"].partition("x")
        dh, _, dw = fields["dil"].partition("x")
        rpb = fields["rpb"].lower()
        if rpb not in ("0", "1", "true", "false"):
            raise ValueError(f"rpb must be 0 or 1, got {fields['rpb']!r}")
        case = TuneCase(direction, int(fields["B"]), int(fields["H"]), int(fields["W"]),
                        int(fields["heads"]), int(fields["d"]), int(kh), int(kw or kh),
                        int(dh), int(dw or dh), dtype, fields["padding"], fields["rel"],
                        rpb in ("1", "true"))
    except ValueError as e:
        raise ValueError(f"bad key {spec!r}: {e}") from None
    check_case(case)
    return case


def check_case(case: TuneCase) -> None:
    case.key.check()
    if case.B < 1 or case.H < 1 or case.W < 1:
        raise ValueError(f"B, H, W must be >= 1 in {case.spec()}")
    if case.kh % 2 == 0 or case.kw % 2 == 0:
        raise ValueError(f"k must be odd in {case.spec()}")
    if case.padding == "shift" and (case.kh * case.dh > case.H or case.kw * case.dw > case.W):
        raise ValueError(f"padding=shift needs k * dil <= H, W in {case.spec()}")
