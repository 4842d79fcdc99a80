"""Training checkpoints that survive a kill at any moment: model + optimizer + RNG + step + data position.

Layout of a checkpoint directory: the AVCaptioner's own files (model.safetensors, config.json,
tokenizer.json), optimizer.safetensors (every optimizer tensor plus the torch RNG state) and
train_state.json (step, data position, argparse namespace, optimizer hyper-parameters). The whole
directory is written under a temporary name and swapped in with os.replace; the previous one is
kept as DIR.old until the swap is done, and `resume_path` falls back to it, so a kill mid-write
never loses the last good checkpoint. Nothing is pickled.
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file

from .weights import save_file_atomic, write_json_atomic


def save(path, model, optimizer, state):
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    opt = optimizer.state_dict()
    tensors, scalars = {"rng.torch": torch.get_rng_state()}, {}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    save_file_atomic(tensors, os.path.join(tmp, "optimizer.safetensors"))
    write_json_atomic(dict(state, param_groups=opt["param_groups"], optimizer_scalars=scalars),
                      os.path.join(tmp, "train_state.json"))
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def resume_path(path):
    """The checkpoint to resume from: DIR, or DIR.old when a kill interrupted the swap."""
    for p in (path, path + ".old"):
        if os.path.exists(os.path.join(p, "train_state.json")):
            return p
    raise FileNotFoundError(f"{path}: no complete checkpoint to resume from")


def load_state(path, optimizer):
    """Restore optimizer + RNG from a checkpoint directory; returns the saved state dict."""
    with open(os.path.join(path, "train_state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    opt_state = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for key, v in state.pop("optimizer_scalars").items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
