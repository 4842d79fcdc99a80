"""What every avnano captioner shares (model.AVCaptioner, omni.OmniThinker): the ChatML prompt, the caption loss, completion
log-probs, sampling with its text cut, and the parameter groups of staged training.

A subclass supplies its encoders (av_block), its layout (layout: prompt + AV block + caption -> layout.Layout on the
device, from a plan built on the host; plan_layout: that plan, not yet copied) and says where its parameters belong:
TOWERS maps a top-level module name to its group, ALIGNERS lists the name prefixes of the aligners; `media_tag` is what
the user turn starts with and `mask_kind` which attention mask the decoder gets (layout.attention_mask)."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import masks
from .augment import caption_inputs
from .generate import generate
from .layout import attention_mask


class Captioner(nn.Module):
    GROUPS = ("vit", "audio", "aligners", "decoder", "lora")
    TOWERS, ALIGNERS = {}, ()  # top-level module -> group (default: its own name); aligner name prefixes

    def render(self, caption=None, prompt=None):
        """ChatML ids + loss mask: (system,) user = the media tag + the instruction, (caption)."""
        system = getattr(self.cfg, "system", None)
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": self.media_tag + (prompt or self.cfg.prompt)}]
        return self.tok.render(msgs, completion=caption)

    def completion_ids(self, caption):
        """The token ids a caption is trained on (its text + end token), as render() produces them."""
        ids, mask = self.render(caption)
        return [i for i, m in zip(ids, mask) if m]

    def hidden_states(self, blocks, ids, loss_masks=None, word_dropout=0.0, plan=None, word_swap=0.0):
        """Decoder hidden states of prompt + AV block + completion, and the layout's shifted labels.
        word_dropout / word_swap: training-time caption input perturbations (augment.caption_inputs).
        plan: a Plan already holding this layout on the device (plan_layout, copied)."""
        x = self.layout(blocks, ids, loss_masks, plan=plan)
        if word_dropout > 0 or word_swap > 0:
            x = x._replace(embeds=caption_inputs(x.embeds, x.labels, self.decoder.embed, word_dropout, word_swap,
                                                 getattr(self, "swap_ids", None)))
        h = self.decoder(inputs_embeds=x.embeds, positions=x.positions, return_hidden=True,
                         mask=attention_mask(self.mask_kind, x.is_av, x.valid, x.right_padded))
        return h, x

    def caption_loss(self, h, x, plan, ot=None, ground=None, return_hidden=False):
        """forward's tail: cross-entropy on the labelled positions (host-planned indices), the weighted extra losses,
        and n_tokens / n_seq as host ints (the step never waits on the device)."""
        logits = self.decoder.logits(h.flatten(0, 1)[x.label_index]).float()
        ce = F.cross_entropy(logits, x.label_targets, label_smoothing=self.cfg.label_smoothing)
        zero = torch.zeros((), device=self.device)
        ot, ground = zero if ot is None else ot, zero if ground is None else ground
        out = dict(loss=ce + self.cfg.ot_weight * ot + self.cfg.ground_weight * ground, ce=ce, ot=ot, ground=ground,
                   n_tokens=plan.meta["n_tokens"], n_seq=plan.meta["n_seq"])
        if return_hidden:
            out.update(hidden=h, is_av=x.is_av)
        return out

    def completion_logprobs(self, blocks, completions, temperature=1.0, prompt=None):
        """Log-probs of given completion token ids (a list per AV block, EOS included) after the AV
        prompt, with logits divided by `temperature` exactly as when sampling. `blocks` come from
        av_block(): post-training encodes each clip once and scores every sequence on it. Returns
        (B, T) log-probs and the (B, T) float mask of real completion tokens (rows right-padded)."""
        prompt_ids = self.render(prompt=prompt)[0]
        ids = [prompt_ids + list(c) for c in completions]
        loss_masks = [[0] * len(prompt_ids) + [1] * len(c) for c in completions]
        plan = self.plan_layout(blocks, ids, loss_masks)
        lengths = np.array([len(c) for c in completions])
        plan.host["lp.mask"] = (np.arange(lengths.max()) < lengths[:, None]).astype(np.float32)
        plan.host["lp.index"] = np.flatnonzero(plan.host["lp.mask"])  # row by row, as the labels
        h, x = self.hidden_states(blocks, ids, loss_masks, plan=plan.to_device(self.device))
        # the labelled positions, row by row, in order: exactly the completion tokens
        logp = torch.log_softmax(self.decoder.logits(h.flatten(0, 1)[x.label_index]).float() / temperature, -1)
        logp = logp.gather(-1, x.label_targets[:, None])[:, 0]
        mask = plan.dev["lp.mask"]
        return logp.new_zeros(mask.numel()).index_copy(0, plan.dev["lp.index"], logp).view(mask.shape), mask

    @torch.no_grad()
    def generate(self, frames, frame_times, audio, prompt=None, return_ids=False, blocks=None, **sampling):
        """Captions (list of str) for a batch of clips, or for already encoded `blocks` (then frames,
        frame_times and audio are ignored); sampling kwargs as avnano.generate.generate."""
        blocks = blocks if blocks is not None else self.av_block(frames, frame_times, audio)[0]
        x = self.layout(blocks, [self.render(prompt=prompt)[0] for _ in blocks], left_pad=True)
        prefill = masks.av_prefix(x.is_av) if self.mask_kind == "prefix" else None
        out = generate(self.decoder, inputs_embeds=x.embeds, attention_mask=x.valid, positions=x.positions, prefill_mask=prefill,
                       eos_ids=self.tok.eos_ids, pad_id=self.tok.pad_id, **sampling)
        stop = set(self.tok.eos_ids) | {self.tok.pad_id}
        texts = []
        for row in out.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(self.tok.decode(row[:cut]))
        return (texts, out) if return_ids else texts

    def param_groups(self):
        """name -> group: vit, audio, aligners, decoder, lora (for staged training)."""
        groups = {}
        for name, _ in self.named_parameters():
            top = name.split(".")[0]
            aligner = name.startswith(self.ALIGNERS)
            groups[name] = "lora" if "lora_" in name else "aligners" if aligner else self.TOWERS.get(top, top)
        return groups

    def set_trainable(self, groups):
        """Freeze everything but the named groups (any of GROUPS). What trains is a float32 master weight:
        a bfloat16 load (a released thinker on CUDA) keeps its frozen weights in bfloat16 and casts the trained ones up;
        AdamW on bfloat16 weights loses every update below 2^-8 of the weight. autocast runs the matmuls in bfloat16."""
        unknown = set(groups) - set(self.GROUPS)
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}")
        owner = self.param_groups()
        for name, p in self.named_parameters():
            p.requires_grad_(owner[name] in groups)
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()

    @property
    def device(self):
        return self.decoder.embed.weight.device

    @property
    def dtype(self):
        return self.decoder.embed.weight.dtype
