"""Train a small SASA-ResNet with DistributedDataParallel, with checkpoint save and resume.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 20 --ckpt-dir ckpt
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 40 --ckpt-dir ckpt --resume
    python examples/train_ddp.py --steps 20            # one process, no torch.distributed

One process per device: gloo on CPU, nccl on GPU (each rank takes cuda:LOCAL_RANK).
The data is synthetic and a pure function of (seed, step): every step draws one global
batch and rank r trains on its r-th slice, so N processes step exactly like one process
on the global batch (DDP averages the gradients of the per-rank mean losses), and a
resumed run sees the same batches as an uninterrupted one.

Normalization: BatchNorm statistics are per process, which makes an N-process step
differ from a one-process step; the default `--norm group` swaps every BatchNorm2d of
the network for a GroupNorm (batch-independent, so the two are equal), `--norm batch`
keeps BatchNorm, `--norm syncbatch` uses SyncBatchNorm (GPU only).

Checkpoints: rank 0 alone writes `<ckpt-dir>/step<N>.pt` and `last.pt` (model without
the DDP wrapper, optimizer state, step; written to a temporary file and renamed, so a
reader never sees half a file); every rank reads `last.pt` on `--resume`.

Tuned tables (GPU): each rank reads the tuned-kernel table (`sasa_triton.autotune`'s
JSON in $SASA_TRITON_CACHE_DIR, then the one shipped in the package) once per call
shape and never writes it; run `python -m sasa_triton.autotune` once, in one process,
before launching. Writes are atomic (temporary file + rename) under a file lock, so even
tuners running concurrently merge their entries and readers see a whole table.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sasa_triton.nn import ResNet

CLASSES = 10


def build_model(norm: str = "group") -> nn.Module:
    """A small SASA-ResNet (bottleneck stages [1, 1, 1, 1], k = 3, 2 heads) for 32 x 32 input."""
    model = ResNet((1, 1, 1, 1), num_classes=CLASSES, kernel_size=3, heads=2,
                   widths=(8, 16, 16, 32))
    if norm == "group":
        _replace_batchnorm(model)
    elif norm == "syncbatch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif norm != "batch":
        raise ValueError(f"norm must be group, batch or syncbatch, got {norm!r}")
    return model


def _replace_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm2d becomes a GroupNorm with its affine weights (zero-init kept)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(min(4, child.num_features), child.num_features)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            _replace_batchnorm(child)


def global_batch(step: int, batch: int, seed: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's whole batch (images, labels): labels decide which quadrant is bright."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(CLASSES, (batch,), generator=g)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    for n, label in enumerate(labels.tolist()):
        y, x = divmod(label % 4, 2)
        images[n, label % 3, 16 * y:16 * y + 16, 16 * x:16 * x + 16] += 1.0 + label / CLASSES
    return images.to(dtype), labels


def save_checkpoint(path: Path, model: nn.Module, optimizer, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--batch", type=int, default=16, help="global batch (all ranks)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm", default="group", choices=("group", "batch", "syncbatch"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    parser.add_argument("--save-every", type=int, default=0, help="0: only at the end")
    parser.add_argument("--resume", action="store_true", help="continue from ckpt-dir/last.pt")
    args = parser.parse_args(argv)

    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.batch % world:
        parser.error(f"--batch {args.batch} is not divisible by the {world} processes")
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args.norm).to(device=device, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    step = 0
    if args.resume:
        state = torch.load(args.ckpt_dir / "last.pt", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    net = DistributedDataParallel(model) if distributed else model
    if args.ckpt_dir is not None and rank == 0:
        args.ckpt_dir.mkdir(parents=True, exist_ok=True)

    local = args.batch // world
    while step < args.steps:
        step += 1
        images, labels = global_batch(step, args.batch, args.seed, dtype)
        images = images[rank * local:(rank + 1) * local].to(device)
        labels = labels[rank * local:(rank + 1) * local].to(device)
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP: gradients averaged over the ranks here
        optimizer.step()
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f} (rank 0's slice)", flush=True)
        end = step == args.steps
        if args.ckpt_dir is not None and (end or (args.save_every and step % args.save_every == 0)):
            if rank == 0:  # one writer; the others wait so that no one reads a missing file
                save_checkpoint(args.ckpt_dir / f"step{step}.pt", model, optimizer, step)
                save_checkpoint(args.ckpt_dir / "last.pt", model, optimizer, step)
            if distributed:
                dist.barrier()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
