"""Training-input augmentations (departures, ours): attribute-blind views (SimCLR's colour distortion, Chen et al. 2020,
and its mirror image) and caption-word dropout (Bowman et al. 2016) / swaps, for colour-shape pairs never trained on.

The toy world's training split never shows a red triangle, a yellow circle or a green square. Trained on it, the
captioner reads each attribute partly from the other: teacher-forced after the true colour word it named the shape
of none of 40 unseen-pair objects, and the aligned visual token's shape (read through the output head) was right
for 45 % of them against 88 % for seen pairs. Two views of a clip, each drawn with its own probability:
- colour-blind: the frames go through one random 3 x 3 channel mix (every colour becomes another, the same for the
  whole clip); shape, motion and time are untouched;
- shape-blind: every block x block square of each frame is replaced by its mean colour (a blob keeps its colour,
  place and motion, its outline is gone).
The attribute a view hides loses its loss (caption and grounding targets) and is fed to the decoder as a random
word of its kind; everything else is trained as usual, from evidence that cannot carry the hidden attribute: shape
is learned from views without colour and colour from views without shape.
"""
import torch
import torch.nn.functional as F


def blind_views(items, ids, masks, ground, kinds, p_colour, p_shape, generator, block=16, blur=0):
    """items: [(row, frames uint8 (n, H, W, 3), times, audio)]; ids / masks: per clip rendered token ids and loss
    masks; ground: per clip grounding.spans() (or None); kinds: ((colour token ids, colour words), (shape token ids,
    shape words)). Each clip becomes colour-blind with probability p_colour, or shape-blind with probability p_shape
    (blocks of mean colour, or with blur > 0 a blur x blur box blur: a softer blob, closer to the sharp frames).
    Returns new (items, ids, masks, ground); the inputs are not modified."""
    items, ids, masks = list(items), [list(i) for i in ids], [list(m) for m in masks]
    ground = None if ground is None else list(ground)
    draw = torch.rand(len(items), generator=generator)
    for b in range(len(items)):  # host-side: python lists and host random numbers, no device sync
        kind = 0 if draw[b] < p_colour else 1 if draw[b] < p_colour + p_shape else None
        if kind is None:
            continue
        row, frames, times, audio = items[b]
        if kind == 0:
            mix = torch.rand(3, 3, generator=generator).to(frames.device)  # one random colour map for the whole clip
            seen = (frames.float() @ mix.T).clamp(0, 255)
        elif blur:
            x = frames.float().permute(0, 3, 1, 2)
            seen = F.avg_pool2d(x, blur, stride=1, padding=blur // 2, count_include_pad=False).permute(0, 2, 3, 1)
        else:
            n, H, W, C = frames.shape
            means = frames.float().view(n, H // block, block, W // block, block, C).mean((2, 4), keepdim=True)
            seen = means.expand(-1, -1, block, -1, block, -1).reshape(n, H, W, C)
        items[b] = (row, seen.round().to(frames.dtype), times, audio)
        hidden_ids, hidden_words = kinds[kind]
        where = [t for t, (i, m) in enumerate(zip(ids[b], masks[b])) if m and i in hidden_ids]
        fed = torch.randint(len(hidden_ids), (len(where),), generator=generator).tolist()
        for t, k in zip(where, fed):
            ids[b][t], masks[b][t] = hidden_ids[k], 0
        if ground is not None:
            ground[b] = [(t0, t1, mods, text, [w for w in words if w not in hidden_words])
                         for t0, t1, mods, text, words in ground[b]]
    return items, ids, masks, ground


def caption_inputs(embeds, labels, embed, word_dropout=0.0, word_swap=0.0, swap_ids=None):
    """The decoder's input embeddings with the caption's words perturbed (training only; the labels stay):
    - word_dropout (word dropout as in Bowman et al. 2016): each caption token is blanked (a zero embedding) with
      this probability, so the next word has to come from the AV block rather than from the words before it;
    - word_swap: each caption token that is one of swap_ids (the colour words) is fed as a random one of them with
      this probability. Training never shows a red triangle, and a decoder that reads its own colour word learns
      "red -> circle or square": teacher-forced after the true colour it named the shape of no unseen-pair object
      (0 of 40), after a colour seen with every shape 53 %.
    embeds (B, L, D); labels (B, L) shifted (labels[t] is the token at t + 1, -100 where none); embed: the decoder's
    token embedding."""
    fed = F.pad(labels[:, :-1], (1, 0), value=-100)  # the caption token fed at t (-100 elsewhere)
    if word_dropout > 0:
        drop = (fed != -100) & (torch.rand(fed.shape, device=fed.device) < word_dropout)
        embeds = embeds.masked_fill(drop[..., None], 0.0)
    if word_swap > 0 and swap_ids is not None and len(swap_ids):
        hit = torch.isin(fed, swap_ids) & (torch.rand(fed.shape, device=fed.device) < word_swap)
        new = swap_ids[torch.randint(len(swap_ids), fed.shape, device=fed.device)]
        embeds = torch.where(hit[..., None], embed(new).to(embeds.dtype), embeds)
    return embeds
