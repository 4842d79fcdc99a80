"""Hand-rolled LoRA (Hu et al. 2021): y = W x + (alpha / r) B A x, with A (r, in) Kaiming-initialised and
B (out, r) zero, so a fresh adapter changes nothing.

Operations the seed papers need: inject by module-name pattern (video-SALMONN 2 / LAVCap put LoRA on
the LLM, LAVCap also on the audio encoder); merge W += (alpha/r) B A and re-initialise a fresh adapter
(the multi-round DPO "LoRA proxy"); a context manager that switches adapters off, which gives
reference log-probs without a second model copy.
`LoRALinear` *is* an nn.Linear (same `weight` / `bias` names), so weight loaders and checkpoints of
the base model keep their keys; the adapter adds `lora_A` / `lora_B`.
"""
import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scale = r, alpha / r
        # the adapter (and so its AdamW state) stays float32 whatever the base's dtype: bf16 cannot hold
        # the small updates of a zero-initialised B
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=base.weight.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout)
        self.enabled, self.merged = True, False
        self.reset_adapter()

    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            a = self.dropout(x).to(self.lora_A.dtype)  # a no-op in fp32 and under autocast (which casts again)
            y = y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scale).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += ((self.lora_B @ self.lora_A) * self.scale).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= ((self.lora_B @ self.lora_A) * self.scale).to(self.weight.dtype)
            self.merged = False


def inject(model, patterns, r=8, alpha=16, dropout=0.0):
    """Wrap every nn.Linear whose qualified name matches one of the regexes (re.search). Returns the names."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and any(re.search(p, name) for p in patterns)]
    if not targets:
        raise ValueError(f"no nn.Linear matches LoRA patterns {patterns}")
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(m, r, alpha, dropout))
    return [name for name, _ in targets]


def adapters(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def new_proxy(model):
    """mrDPO round step: fold the current adapter into the base weights, start a fresh (zero) one."""
    for m in adapters(model):
        m.merge()
        m.reset_adapter()
        m.merged = False


def restart(model, r, alpha, dropout=0.0):
    """Fold every adapter into its base weight and put a fresh rank-r one in its place (a new run that
    starts from a LoRA-tuned checkpoint: its adapter becomes part of the base, which any rank can extend)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))


@contextmanager
def disabled(model):
    """Run the base model: adapters contribute nothing inside the block (merged ones are un-merged)."""
    mods = adapters(model)
    state = [(m.enabled, m.merged) for m in mods]
    for m in mods:
        m.unmerge()
        m.enabled = False
    try:
        yield model
    finally:
        for m, (enabled, merged) in zip(mods, state):
            m.enabled = enabled
            if merged:
                m.merge()


def count_trainable(model):
    """(trainable parameters, all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
