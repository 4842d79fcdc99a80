"""Caption-input perturbations for training (departures, ours): word dropout (Bowman et al. 2016) and colour-word swaps.

The toy world's training split never shows a red triangle, a yellow circle or a green square. A decoder that reads
its own colour word learns "red -> circle or square"; feeding colour words as random colours closes that route (the
visual side of the fix is colour.py). Attribute-blind views of the frames (colour-blind: a random colour mix with the
colour words untrained; shape-blind: block means or a box blur with the shape words untrained) were tried and
removed (README's history; code of commit c09c5d5).
"""
import torch
import torch.nn.functional as F


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
