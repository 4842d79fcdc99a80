"""Benchmark of one SFT step on the CPU: where its time goes, how many aten ops it issues and how many host <-> device
sync points it has (not collected by pytest: its name is bench_*).

    python tests/bench_train.py                                   # tiny and small (and a GPU preset if there is one)
    python tests/bench_train.py --presets tiny --json after.json
    cd OLD_CHECKOUT && python /work/main/tests/bench_train.py --presets tiny --json before.json   # the same bench, old code
    python tests/bench_train.py --compare before.json after.json  # the before / after table

Counting (torch.profiler around one step, on the CPU the stand-in for GPU syncs): sync points are the ops that read
a device value on the host -- aten::_local_scalar_dense (.item(), int(t), float(t), bool(t)), aten::nonzero (and the
boolean indexing that calls it), ops with data-dependent output sizes (unique, masked_select) -- plus the Tensor.tolist() / .cpu() calls (a TorchFunctionMode counts those: the CPU profiler does not see
them). aten::_assert_async is asynchronous on a GPU; on the CPU it reads its flag, so its reads are subtracted. The
optimizer's reads of its own step counters are counted apart (CPU scalars on a GPU too: no device sync).
Host->device copies: torch.tensor / torch.as_tensor / Tensor.to(device) calls inside the step (an upper bound: on
the CPU a copy to the host itself cannot be told apart). The step is train_sft.py's: forward with grounding, backward,
gradient clipping, AdamW, and the logged numbers read as the code under test reads them (one read per step since
the host-layout change; sums.tolist() and float(grad_norm) before it). The breakdown times the pieces one by one:
data (clips from the cache, ids, spans), encoders (model.av_block), layout (assemble + grounding loss), decoder
(decoder + logits + cross-entropy), backward, optimizer. Times on a shared machine: compare runs side by side.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())  # the checkout the bench runs in (its avnano), so it can time older code too
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from avnano import grounding  # noqa: E402
from avnano.data import ClipStore, read_splits  # noqa: E402
from avnano.layout import assemble, attention_mask  # noqa: E402
from avnano.model import PRESETS, AVCaptioner, preset  # noqa: E402
from avnano.tokenizer import Tokenizer  # noqa: E402
from avnano.training import make_optimizer  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::masked_select",
            "aten::unique_consecutive")
HOST_READS = ("tolist", "cpu")
H2D = ("tensor", "as_tensor")


def _from_avnano():
    """True when the op was called from avnano's code (not from inside torch, e.g. clip_grad_norm_'s own .to())."""
    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename == __file__):
        f = f.f_back
    return f is not None and "/avnano/" in f.f_code.co_filename


class Reads(TorchFunctionMode):
    """Counts Tensor.tolist() / .cpu() calls (device reads the CPU profiler cannot see), and host->device copies made by
    avnano: torch.tensor / as_tensor of host data, or Tensor.to, given a torch.device (an explicit "cpu" string means a
    host tensor). On the CPU a .to() of a tensor already there is counted too: an upper bound."""

    def __init__(self):
        super().__init__()
        self.reads = self.h2d = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name, kwargs = getattr(func, "__name__", ""), kwargs or {}
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.reads += 1
        elif name in H2D and isinstance(kwargs.get("device"), torch.device) and not isinstance(args[0], torch.Tensor):
            self.h2d += _from_avnano()
        elif name == "to" and (any(isinstance(a, torch.device) for a in args[1:]) or isinstance(kwargs.get("device"), torch.device)):
            self.h2d += _from_avnano()
        return func(*args, **kwargs)


def counts(prof):
    ev = prof.events()
    names = [e.name for e in ev]
    asserts = names.count("aten::_assert_async")
    return dict(aten_ops=sum(n.startswith("aten::") for n in names),
                syncs=sum(names.count(n) for n in SYNC_OPS) - asserts)


def logged_reads(out, grad_norm, new_code):
    """The step line's numbers, read as train_sft.py reads them (one stacked read now; two before)."""
    keys = ("loss", "ce", "ot", "ground")
    if new_code:
        return torch.stack([out[k].detach().float() for k in keys] + [grad_norm.float()]).tolist()
    return [*torch.stack([out[k].detach().float() for k in keys]).tolist(), float(grad_norm)]


def make(preset_name, rows, vocab, seed=0):
    torch.manual_seed(seed)
    tok = Tokenizer.train([r["caption"] for r in rows[:2000]] + ["Describe the clip."], vocab_size=vocab)
    model = AVCaptioner(preset(preset_name, tok.vocab_size, ground_weight=1.0), tok).train()
    return model, make_optimizer(model, 1e-4, 0.01)


def batch(store, idx):
    t0 = time.perf_counter()
    items = [(store.rows[i], *store.get(i)) for i in idx]
    return items, time.perf_counter() - t0


def step(model, optimizer, items, new_code, optimize=True):
    """One train_sft.py step (one micro-batch) -> the logged numbers; optimize=False stops before optimizer.step()."""
    optimizer.zero_grad(set_to_none=True)
    ids, masks = zip(*(model.render(r["caption"]) for r, *_ in items))
    ground = [grounding.spans(r.get("events", [])) for r, *_ in items]
    out = model([it[1] for it in items], [it[2] for it in items], [it[3] for it in items], ids, masks, ground=ground)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    reads = logged_reads(out, grad_norm, new_code)
    if optimize:
        optimizer.step()
    return reads


def pieces(model, optimizer, items, t):
    """The same step cut into timed pieces (each piece's own API; the layout of a standalone call plans itself)."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    ids, masks = zip(*(model.render(r["caption"]) for r, *_ in items))
    ground = [grounding.spans(r.get("events", [])) for r, *_ in items]
    t1 = time.perf_counter()
    blocks, ot = model.av_block([it[1] for it in items], [it[2] for it in items], [it[3] for it in items])
    t2 = time.perf_counter()
    g = grounding.loss(model, blocks, ground)
    x = assemble(model, blocks, ids, masks)
    mask = attention_mask(model.cfg.mask, x.is_av, x.valid)
    sel = x.labels != -100  # (a boolean index: the bench's own read, outside the counted step)
    t3 = time.perf_counter()
    h = model.decoder(inputs_embeds=x.embeds, positions=x.positions, mask=mask, return_hidden=True)
    loss = F.cross_entropy(model.decoder.logits(h[sel]).float(), x.labels[sel]) + g + 0 * ot
    t4 = time.perf_counter()
    loss.backward()
    t5 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    t6 = time.perf_counter()
    for k, v in zip(("data", "encoders", "layout", "decoder", "backward", "optimizer"),
                    (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
        t[k].append(v)


def bench_preset(name, store, args, new_code):
    model, optimizer = make(name, store.rows, args.vocab)
    n = len(store.rows) // args.batch
    idx = [list(range(b * args.batch, (b + 1) * args.batch)) for b in range(n)]
    res = dict(preset=name, batch=args.batch, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    data_s = [batch(store, i)[1] for i in idx[:args.steps + 2]]  # decode once (cache); later gets are cache hits
    for b in range(2):  # warm-up
        step(model, optimizer, batch(store, idx[b])[0], new_code)
    # counts: one profiled step, the optimizer apart
    items = batch(store, idx[2 % n])[0]
    mode = Reads()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof, mode:
        step(model, optimizer, items, new_code, optimize=False)
    c = counts(prof)
    res.update(aten_ops_step=c["aten_ops"], syncs_step=c["syncs"] + mode.reads, h2d_step=mode.h2d)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
    c = counts(prof)
    res.update(aten_ops_optimizer=c["aten_ops"], host_scalar_reads_optimizer=c["syncs"])
    # step time: the real step, median of args.steps
    times = []
    for s in range(args.steps):
        items = batch(store, idx[(3 + s) % n])[0]
        t0 = time.perf_counter()
        step(model, optimizer, items, new_code)
        times.append(time.perf_counter() - t0)
    res["step_s"] = statistics.median(times)
    res["data_decode_s_per_batch"] = statistics.median(data_s[:2])
    # breakdown
    t = {k: [] for k in ("data", "encoders", "layout", "decoder", "backward", "optimizer")}
    for s in range(args.steps):
        items, dt = batch(store, idx[(3 + s) % n])
        pieces(model, optimizer, items, t)
        t["data"][-1] += dt
    res["breakdown_s"] = {k: statistics.median(v) for k, v in t.items()}
    # greedy decoding: sync points per generated token
    model.eval()
    items = batch(store, idx[0])[0][:args.gen_batch]
    with torch.no_grad():
        blocks = model.av_block([it[1] for it in items], [it[2] for it in items], [it[3] for it in items])[0]
        mode = Reads()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, mode:
            _, out_ids = model.generate(None, None, None, blocks=blocks, return_ids=True, max_new_tokens=args.gen_tokens)
    c = counts(prof)
    # per token: the reads of the decoding itself, not the one read of the finished ids (captions are text on the host)
    res.update(gen_tokens=int(out_ids.shape[1]), gen_syncs=c["syncs"] + mode.reads,
               gen_syncs_per_token=(c["syncs"] + mode.reads - 1) / max(1, out_ids.shape[1]))
    model.train()
    return res


def table(before, after):
    rows = [("aten ops per step (fwd+bwd+clip+log)", "aten_ops_step", "{:.0f}"), ("host-sync points per step", "syncs_step", "{:.0f}"),
            ("host->device copies per step (upper bound)", "h2d_step", "{:.0f}"), ("step time s (median)", "step_s", "{:.3f}"),
            ("greedy decoding: syncs of one generate() call", "gen_syncs", "{:.0f}"), ("greedy decoding: tokens", "gen_tokens", "{:.0f}"),
            ("greedy decoding: syncs per token (less the result read)", "gen_syncs_per_token", "{:.4f}"),
            ("optimizer aten ops", "aten_ops_optimizer", "{:.0f}")]
    out = []
    for r in before + after:  # files written before the per-token figure left out the result read
        r["gen_syncs_per_token"] = (r["gen_syncs"] - 1) / max(1, r["gen_tokens"])
    for b in before:
        a = next((x for x in after if x["preset"] == b["preset"] and x["batch"] == b["batch"]), None)
        if a is None:
            continue
        out.append(f"\n{b['preset']} preset ({a['params_m']:.1f}M parameters), batch {b['batch']}\n| | before | after | after / before |\n|---|---|---|---|")
        for label, k, fmt in rows:
            out.append(f"| {label} | {fmt.format(b[k])} | {fmt.format(a[k])} | {a[k] / b[k]:.2f} |" if b[k] else
                       f"| {label} | {fmt.format(b[k])} | {fmt.format(a[k])} | - |")
        for k in b["breakdown_s"]:
            out.append(f"| {k} s | {b['breakdown_s'][k]:.4f} | {a['breakdown_s'][k]:.4f} | {a['breakdown_s'][k] / max(b['breakdown_s'][k], 1e-9):.2f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(k for k in PRESETS if k in ("tiny", "small") or "gpu" in k or "135" in k),
                   help="comma-separated presets")
    p.add_argument("--data", default="/work/main/data/toyworld", help="toy world directory (train.jsonl)")
    p.add_argument("--clips", type=int, default=96, help="training clips to load (decoded once)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--add-presets", default=None, help="JSON file of extra presets (name -> PRESETS entry): a preset the "
                   "older checkout lacks, measured there too")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None, help="print the table of two --json files")
    args = p.parse_args()
    if args.compare:
        before, after = (json.load(open(f)) for f in args.compare)
        print(table(before, after))
        return
    torch.set_num_threads(args.threads)
    if args.add_presets:
        PRESETS.update(json.load(open(args.add_presets)))
    new_code = "label_index" in open(os.path.join(os.getcwd(), "avnano", "layout.py")).read()
    rows = read_splits(args.data)[0][:args.clips]
    results = []
    for name in args.presets.split(","):
        store = ClipStore(rows, 2.0, 16, PRESETS[name]["vit"]["image_size"])
        r = bench_preset(name, store, args, new_code)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
