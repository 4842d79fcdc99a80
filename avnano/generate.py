"""Sampling from the decoder with a KV cache: prefill once, then one token per step (optionally compiled).

Greedy, temperature, top-k and top-p (nucleus, Holtzman et al. 2020) sampling with a seeded
torch.Generator, and beam search with the GNMT length penalty lp(Y) = (5 + |Y|)^a / 6^a (Wu et al.
2016; AVCap decodes with 4 beams, a = 0.6). Batches are left-padded so every sequence's newest token
sits in the same cache slot; padding is masked out of attention and positions count real tokens
only. Prompts are token ids or embeddings (the AV model's prefix), optionally with their own
positions and prefill mask (time-aligned ids, Qwen2.5-Omni's (3, B, T) TMRoPE ids, the AVCap prefix
mask). Each sequence stops at its own EOS; the returned ids keep the first EOS and fill the rest
with `pad_id`.
"""
import os

import torch
import torch.nn.functional as F

from . import masks

CHECK_EVERY = 16  # greedy / sampled decoding reads the finished flags from the device every this many tokens


def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prefill(model, input_ids, inputs_embeds, attention_mask, positions, prefill_mask, max_new_tokens):
    """Run the prompt through the model once; returns (cache, last logits, key-valid table, next positions)."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, T = x.shape[:2]
    valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask.bool()
    if positions is None:  # count real tokens only, so a left-padded prompt starts at position 0
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = prefill_mask
    if mask is None and not valid.all():
        mask = masks.causal(T, x.device)
    if mask is not None:
        mask = masks.for_sdpa(mask & masks.key_padding(valid))
    dtype = model.embed.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
    if torch.is_autocast_enabled(x.device.type):  # keys and values arrive in the autocast dtype (bf16 on CUDA)
        dtype = torch.get_autocast_dtype(x.device.type)
    cache = model.new_cache(B, T + max_new_tokens, dtype)
    logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, positions=positions, mask=mask,
                   cache=cache, last_only=True)[:, -1]
    valid = torch.cat([valid, valid.new_ones(B, max_new_tokens)], dim=1)
    # new tokens continue one past the row's largest prefill id; with (3, B, T) TMRoPE ids that is the max
    # over t, h, w and they get t = h = w (transformers: text index + rope_deltas, the same numbers)
    next_pos = positions.reshape(-1, B, T).masked_fill(~valid[:, :T], -1).amax(dim=(0, 2)) + 1
    return cache, logits, valid, next_pos


def _step(model, ids, cache, valid, pos):
    """Feed one new token per row; returns its logits (B, V). The mask spans the whole cache (real
    tokens up to and including this one), so every step has the same shapes."""
    keys = valid & (torch.arange(valid.shape[1], device=valid.device) <= cache.pos)
    return model(input_ids=ids[:, None], positions=pos[:, None], mask=keys[:, None, None], cache=cache)[:, -1]


@torch.no_grad()
def generate(model, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None,
             prefill_mask=None, max_new_tokens=64, eos_ids=(), pad_id=0, temperature=0.0, top_k=0,
             top_p=1.0, generator=None, num_beams=1, length_penalty=0.6, on_token=None):
    """Returns new ids (B, N), N <= max_new_tokens. on_token(ids (B,)) is called after every step
    (streaming). num_beams > 1 switches to beam search (deterministic; sampling flags ignored)."""
    if num_beams > 1:
        return beam_search(model, input_ids, inputs_embeds, attention_mask, positions, prefill_mask,
                           max_new_tokens, eos_ids, pad_id, num_beams, length_penalty)
    cache, logits, valid, pos = _prefill(model, input_ids, inputs_embeds, attention_mask, positions,
                                         prefill_mask, max_new_tokens)
    eos = torch.tensor(list(eos_ids), device=logits.device, dtype=torch.long)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    # finished rows are looked for every CHECK_EVERY tokens (one device read each; every token when streaming):
    # the steps run past the one where every row finished emit only pad, and are cut off again below
    every, late, out = 1 if on_token is not None else CHECK_EVERY, torch.zeros((), dtype=torch.long, device=logits.device), []
    for t in range(max_new_tokens):
        sampled = sample_next(logits, temperature, top_k, top_p, generator)
        ids = sampled.masked_fill(done, pad_id)  # finished rows emit pad (but feed a real token on)
        out.append(ids)
        if on_token is not None:
            on_token(ids)
        done = done | torch.isin(ids, eos)
        late = late + done.all()  # steps at whose end every row had finished
        if (t + 1) % every == 0 or t == max_new_tokens - 1:
            n_late = int(late)  # the one device read of these `every` tokens
            if n_late or t == max_new_tokens - 1:
                return torch.stack(out[:len(out) - max(n_late - 1, 0)], dim=1)  # up to the step where all finished
        logits = _step(model, sampled, cache, valid, pos)
        pos = pos + 1
    return torch.stack(out, dim=1)


CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "avnano", "inductor")


def compile_for_sampling(model, freeze=True, max_autotune=True, cpp_wrapper=True, cache_dir=None, prepack=True):
    """torch.compile a decoder for sampling only. The static KV cache gives one prefill and one decode
    graph per batch size and dtype. On CPU the three Inductor switches are what make it pay (README:
    1.5-2.1x transformers, against ~1.1x eager): freezing turns the weights into constants prepacked for
    MKL / oneDNN (so later weight updates are not seen), max-autotune lets Inductor's own C++ GEMMs
    compete with those, the C++ wrapper calls the kernels without Python. The switches are Inductor's
    process-wide settings. Compiling takes minutes the first time; Inductor's on-disk caches keep the work
    for later runs: the FX graph cache (each graph's generated code, keyed by graph, shapes, dtypes and
    settings), the autotuning results and the compiled C++ kernels, under cache_dir (default: the
    TORCHINDUCTOR_CACHE_DIR environment variable, else ~/.cache/avnano/inductor rather than Inductor's /tmp).
    Tracing and AOTAutograd run again in every process (AOTAutograd's cache refuses frozen graphs). On CPU, freezing
    prepacks the weights for oneDNN, and such tensors cannot be pickled: Inductor then bypasses the FX graph cache
    ("mkldnn tensors unpickleable", torch 2.13) and only the C++ and autotuning caches help; prepack=False keeps
    plain weights so the whole compiled graph is cached (README: what each choice costs)."""
    import torch._functorch.config
    import torch._inductor.config
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or CACHE_DIR
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.autotune_local_cache = True
    torch._functorch.config.enable_autograd_cache = True  # used when freeze=False
    torch._dynamo.config.cache_size_limit = 64  # graphs per (batch, dtype, prefill/decode)
    torch._inductor.config.freezing = freeze
    torch._inductor.config.max_autotune = max_autotune
    torch._inductor.config.cpp_wrapper = cpp_wrapper
    torch._inductor.config.cpp.weight_prepack = prepack
    return torch.compile(model, dynamic=False)


def length_penalty_gnmt(length, alpha):
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None,
                prefill_mask=None, max_new_tokens=64, eos_ids=(), pad_id=0, num_beams=4, length_penalty=0.6):
    """Beam search over summed log-probs; finished hypotheses are ranked by score / lp(|Y|), |Y|
    counting the EOS. A batch row stops once it holds `num_beams` finished hypotheses and its best
    live beam, normalised at the current length, cannot beat the worst of them (the usual heuristic)."""
    W = num_beams
    cache, logits, valid, pos = _prefill(model, input_ids, inputs_embeds, attention_mask, positions,
                                         prefill_mask, max_new_tokens)
    B, V = logits.shape
    rows = torch.arange(B, device=logits.device).repeat_interleave(W)
    cache.reorder(rows)
    valid, pos, logits = valid[rows], pos[rows], logits[rows]
    scores = torch.full((B, W), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0  # all beams start identical: let only the first one expand at step 1
    seqs = torch.zeros(B * W, 0, dtype=torch.long, device=logits.device)
    finished = [[] for _ in range(B)]  # (normalised score, token list)
    closed = [False] * B
    eos = set(eos_ids)
    for t in range(max_new_tokens):
        cand = (scores.view(-1, 1) + F.log_softmax(logits.float(), -1)).view(B, W * V)
        top_scores, top_idx = cand.topk(2 * W, dim=-1)
        new_scores = torch.full((B, W), float("-inf"), device=logits.device)
        src = torch.zeros(B, W, dtype=torch.long, device=logits.device)
        tok = torch.full((B, W), pad_id, dtype=torch.long, device=logits.device)
        for b in range(B):
            if closed[b]:
                continue
            k = 0
            for s, i in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, token = divmod(i, V)
                if token in eos:
                    hyp = seqs[b * W + beam].tolist() + [token]
                    finished[b].append((s / length_penalty_gnmt(len(hyp), length_penalty), hyp))
                    continue
                new_scores[b, k], src[b, k], tok[b, k] = s, beam, token
                k += 1
                if k == W:
                    break
            finished[b] = sorted(finished[b], reverse=True)[:W]
            best_live = new_scores[b, 0].item() / length_penalty_gnmt(t + 1, length_penalty)
            if len(finished[b]) == W and best_live <= finished[b][-1][0]:
                closed[b] = True
        flat = (torch.arange(B, device=logits.device)[:, None] * W + src).view(-1)
        seqs = torch.cat([seqs[flat], tok.view(-1, 1)], dim=1)
        scores = new_scores
        if all(closed) or t == max_new_tokens - 1:
            break
        cache.reorder(flat)
        logits = _step(model, tok.view(-1), cache, valid, pos)
        pos = pos + 1
    results = []
    for b in range(B):
        pool = list(finished[b])
        if not closed[b]:  # ran out of steps: live beams compete too
            pool += [(scores[b, w].item() / length_penalty_gnmt(seqs.shape[1], length_penalty), seqs[b * W + w].tolist())
                     for w in range(W) if scores[b, w] > float("-inf")]
        results.append(max(pool)[1])
    N = max(len(r) for r in results)
    return torch.tensor([r + [pad_id] * (N - len(r)) for r in results], device=logits.device)
