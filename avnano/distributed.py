"""One GPU or several: torchrun / DDP setup and teardown, collectives on the model's device, and the CUDA numerics
switches (TF32 for fp32 matmuls, bf16 autocast for every forward pass). After nanoGPT's DDP recipe, with
the collectives DPO / GRPO need because their losses are computed outside DDP's forward.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def backend_for(device, local_rank):
    """(backend, this process's device) under torchrun: nccl on cuda:LOCAL_RANK for any CUDA --device, gloo otherwise."""
    if torch.device(device).type == "cuda":
        return "nccl", f"cuda:{local_rank}"
    return "gloo", device


def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE. Returns (rank, world, device, log); log prints on rank 0 only. The CUDA
    device is chosen before the process group exists (NCCL binds to it); TF32 goes on for every script."""
    allow_tf32()
    rank, world = 0, 1
    if "RANK" in os.environ:
        backend, device = backend_for(device, int(os.environ.get("LOCAL_RANK", 0)))
        extra = {}
        if backend == "nccl":
            torch.cuda.set_device(device)
            extra["device_id"] = torch.device(device)
        # a long timeout: the slowest rank's share of an evaluation or a checkpoint save must not kill the job
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60), **extra)
        rank, world = dist.get_rank(), dist.get_world_size()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    return rank, world, device, log


def allow_tf32():
    """TF32 for the fp32 matmuls and convolutions left outside autocast on CUDA (Ampere and later; no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


CPU_BF16 = False  # tests set it: bf16 autocast on the CPU runs the CUDA path's dtypes where no GPU is lent


def autocast(device):
    """The context of every forward pass (SFT, DPO / GRPO scoring and sampling, evaluation, sample.py): bf16
    autocast on CUDA, none elsewhere (CPU bf16 only when CPU_BF16 is set)."""
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and CPU_BF16):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def teardown(model, log):
    """Under DDP: report how far the replicas drifted apart, then close the process group."""
    if dist.is_initialized():
        log(f"rank_weight_max_diff={rank_weight_diff(model):.3e}")
        dist.barrier()  # every rank idle before the gloo pairs close (else a rank can abort at exit)
        dist.destroy_process_group()


def rank_weight_diff(model):
    """Largest |w_rank - w_rank0| over every parameter and rank: 0 when the replicas stayed in step."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def sync_grads(model, world):
    """Average gradients over ranks (what DDP does inside backward, for losses computed outside its forward)."""
    if world > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def sum_over_ranks(values, world, device):
    """Sum a list of floats over the ranks, reduced on the model's device (NCCL refuses CPU tensors)."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values, world, device):
    """Average a list of floats over the ranks (logged statistics), unchanged when world == 1."""
    return [v / world for v in sum_over_ranks(values, world, device)]


def every_rank(flags, world, device):
    """flags[i] and-ed over the ranks: what all ranks agree to do (one collective, on the model's device)."""
    if world == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def gather(items, world):
    """Every rank's list, concatenated in rank order, on every rank."""
    if world == 1:
        return items
    out = [None] * world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]
