"""Hand-written boolean attention masks (True = query row may attend to key column).

Each function returns a bool tensor and draws its matrix for a small T. Masks compose with `&` / `|`
and are turned into the (B, 1, T, S) shape `F.scaled_dot_product_attention` takes by `for_sdpa`.
The AV block mask is AVCap's M (Kim et al. 2024, "AVCap", Sec. 3.2): audio-visual tokens see each
other bidirectionally, text is causal and sees every AV token, AV tokens never see the caption.
The decoder's `mask=None` is the exact causal mask and takes sdpa's fused `is_causal=True` path;
every other case passes one of these explicitly.
"""
import torch


def causal(T, device=None):
    """Lower-triangular: position i sees 0..i. T=4:
        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1
    """
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def key_padding(valid):
    """valid (B, S) bool, False at pad slots -> (B, 1, S): every query may see only real keys.
    Left-padded row valid = [0 0 1 1] gives, for every query row:
        0 0 1 1
    (A pad query still sees the real keys, so no row is all-False and sdpa never returns NaN.)
    """
    return valid[:, None, :].bool()


def av_prefix(is_av):
    """AVCap mask M for is_av (B, T) bool marking the AV block; the prompt may precede it and the
    caption follows it. Allowed(i, j) = j <= i  or  is_av[j]. With prompt p, AV tokens a, caption c,
    is_av = [0 1 1 0 0] (p a a c c):
            p a a c c
        p   1 1 1 0 0     the prompt sees the AV block (and earlier prompt text)
        a   1 1 1 0 0     AV is bidirectional within itself, sees the prompt, never the caption
        a   1 1 1 0 0
        c   1 1 1 1 0     text is causal over text and sees every AV token
        c   1 1 1 1 1
    """
    T = is_av.shape[-1]
    return causal(T, is_av.device) | is_av[:, None, :].bool()


def for_sdpa(mask):
    """(T, S) / (B, T, S) bool -> (B or 1, 1, T, S) for scaled_dot_product_attention.
    A row with no allowed key (a left-pad query under a causal mask) would make softmax return NaN;
    such rows are opened to every key instead. Their outputs belong to pad slots and are never read."""
    if mask.dim() == 2:
        mask = mask[None]
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None]
