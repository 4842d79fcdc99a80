"""The audio-visual captioner: ViT + audio encoder -> aligners -> interleaver -> decoder, its loss and sampling.

Data flow: frames -> ViT patch tokens -> visual aligner; 16 kHz audio -> segments of
at most t_max -> log-mel -> audio encoder -> (+ segment embedding) -> window Q-Former; then an
interleaver orders both streams into one AV block that replaces the `<|av|>` placeholder of the
ChatML prompt, and the decoder reads prompt + AV block + caption as `inputs_embeds`.
Loss = cross-entropy on the caption tokens (optional label smoothing, AVCap eps 0.1) + optional
lambda * LAVCap OT alignment loss. The attention mask is AVCap's prefix mask M (AV block
bidirectional, caption causal) or plain causal, a config choice; positions are sequential or
time-aligned (Qwen2.5-Omni style, see layout.py).
Every switch the papers ablate is a config field, so one script can compare them. The pieces live
in their own files: captioner.py (prompt, loss tail, log-probs, sampling, parameter groups: shared with
omni.py's thinker), interleave.py (aligners, orders), layout.py (prompt + AV block + caption ->
decoder inputs), grounding.py (the grounding loss), plan.py (the batch's indices, planned on the host and
copied once: a step never reads the device), checkpoint.py (save / load).
Departure (`visual_delta`, on in the tiny preset): the visual aligner reads each frame's merged patch
tokens next to its change since the previous frame, taken per patch and then merged both ways:
[merge(h_t), merge(h_t - h_{t-1}), merge(h_{t-1} - h_t)] (with max-pooling: the largest rise and the
largest fall of each feature over the patches; the motion stream of two-stream video networks,
Simonyan & Zisserman 2014). Appear / disappear / move / bounce are then visible in one token, and the
identity of whatever moved survives the merge (a change of the merged token would cancel it out).
Departure (`object_tokens`, on in the tiny preset): a frame's tokens are its k most salient patches (vit.salient), each
read as above per patch, so one token holds one object and its colour stays bound to its outline.
Departure (`colour_stream`, `colour_mix`, off by default): the visual token adds a colour part from a shape-blind colour
stream, and the ViT sees training clips through random colour mixes (colour.py).
"""
from dataclasses import dataclass, field, fields, replace

import torch

from . import grounding, layout, lora
from .audio import AudioConfig, AudioEncoder, MelSegments, mel_segments
from .captioner import Captioner
from .colour import ColourStream, colour_mixed
from .decoder import Decoder, DecoderConfig
from .interleave import SegmentEmbedding, TimeEmbedding, WindowQFormer, make_aligner, make_audio_aligner
from .layout import assemble
from .plan import Block, Blocks, Plan, host_view, mel_batch, plan_av, predecessors
from .ot import ot_fuse, ot_loss
from .tokenizer import AV, Tokenizer
from .vit import ViT, ViTConfig, preprocess, salient


@dataclass
class AVConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    modalities: str = "av"           # "av", "v" (video only) or "a" (audio only)
    fps: float = 2.0                 # frame rate phi ...
    max_frames: int = 16             # ... capped at m frames (video-SALMONN 2)
    visual_aligner: str = "mlp"      # linear | mlp
    visual_delta: bool = False       # aligner also sees each frame's per-patch change from the previous frame
    colour_stream: int = 0           # > 0: width of a shape-blind colour stream added to the visual token (colour.py)
    colour_mix: float = 0.0          # training: share of clips the ViT sees through a random colour mix (colour.py)
    object_tokens: int = 0           # > 0: a frame's tokens are its k most salient patches, not the merged grid (vit.salient)
    audio_aligner: str = "qformer"   # linear | mlp | qformer
    window: float = 0.5              # Q-Former window in seconds (2 audio tokens / s)
    n_queries: int = 1               # Q-Former queries per window
    max_segments: int = 8            # audio segments of t_max seconds (segment embeddings)
    interleave: str = "per_frame"    # concat | per_frame | avti | chunked
    air: float = 0.25                # AVTI audio-interleaving rate
    chunk_seconds: float = 2.0       # time-chunked interleaving
    time_positions: bool = False     # time-aligned position ids for the AV block
    time_embed: bool = True          # add a sinusoidal clock embedding of each AV token's time
    ids_per_second: int = 25
    mask: str = "prefix"             # prefix (AVCap M) | causal
    label_smoothing: float = 0.0
    ot_weight: float = 0.0           # lambda of the LAVCap OT loss (0 = off)
    ot_fusion: bool = False          # OT-attention fusion before interleaving
    ot_eps: float = 0.1
    ot_iters: int = 50
    ground_weight: float = 0.0       # weight of the grounding loss (0 = off; see grounding.loss)
    word_dropout: float = 0.0        # training: blank this share of the caption's input tokens (see hidden_states)
    word_swap: float = 0.0           # training: feed this share of the caption's swap words as a random one (see hidden_states)
    swap_words: tuple = ("red", "green", "blue", "yellow")  # words exchanged with each other by word_swap
    lora_r: int = 0                  # > 0 wraps lora_targets of the decoder with LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = (r"attn\.(q|k|v|o)_proj", r"mlp\.(gate|up|down)_proj")
    prompt: str = "Describe the clip."

    @property
    def tokens_per_frame(self):
        return self.object_tokens or self.vit.tokens_per_frame

    @classmethod
    def from_dict(cls, d):
        sub = {"vit": ViTConfig, "audio": AudioConfig, "decoder": DecoderConfig}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown AVConfig fields {unknown}")
        kw = {k: (sub[k](**v) if k in sub else tuple(v) if k in ("lora_targets", "swap_words") else v) for k, v in d.items()}
        return cls(**kw)


PRESETS = {
    # CPU-sized: tests and the toy world on a laptop
    "tiny": dict(vit=dict(family="siglip", image_size=64, patch_size=16, dim=64, n_layers=2, n_heads=4, hidden_dim=128, merge=4,
                          merge_mode="max"), visual_delta=True, object_tokens=3,
                 audio=dict(n_mels=80, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_positions=300, pool=5),
                 decoder=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=320)),
    # one-GPU sized
    "small": dict(vit=dict(family="siglip", image_size=64, patch_size=8, dim=192, n_layers=4, n_heads=6, hidden_dim=768, merge=2),
                  audio=dict(n_mels=80, dim=192, n_layers=4, n_heads=6, hidden_dim=768, max_positions=1500),
                  decoder=dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, hidden_dim=1024)),
    # GPU-sized (~180M): a ViT-S/16 at 224 px (2 x 2 merge: 49 tokens per frame), a Whisper-base-shaped audio encoder
    # (50 tokens/s before the Q-Former), a SmolLM2-135M-shaped decoder; step time and memory in the README
    "gpu": dict(vit=dict(family="siglip", image_size=224, patch_size=16, dim=384, n_layers=12, n_heads=6, hidden_dim=1536,
                         merge=2),
                audio=dict(n_mels=80, dim=512, n_layers=6, n_heads=8, hidden_dim=2048, max_positions=1500),
                decoder=dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_theta=100000.0)),
}


def preset(name, vocab_size, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)} (or checkpoint.released_captioner)")
    p = PRESETS[name]
    cfg = AVConfig(vit=ViTConfig(**p["vit"]), audio=AudioConfig(**p["audio"]),
                   decoder=DecoderConfig(vocab_size=vocab_size, **p["decoder"]),
                   **{k: v for k, v in p.items() if k not in ("vit", "audio", "decoder")})
    return replace(cfg, **overrides)  # an unknown override raises TypeError naming it


class AVCaptioner(Captioner):
    """The avnano captioner (render, loss tail, log-probs, sampling, parameter groups: captioner.Captioner)."""
    ALIGNERS = ("visual_aligner.", "audio_aligner.", "segment_embed.", "time_embed.", "colour_stream.", "colour_aligner.")
    media_tag = f"{AV}\n"
    mask_kind = property(lambda self: self.cfg.mask)

    def __init__(self, cfg: AVConfig, tok: Tokenizer, vit=None, audio=None, decoder=None):
        super().__init__()
        self.cfg, self.tok = cfg, tok
        D = cfg.decoder.dim
        self.vit = vit or ViT(cfg.vit)
        self.audio = audio or AudioEncoder(cfg.audio)
        self.decoder = decoder or Decoder(cfg.decoder)
        views = 3 if cfg.visual_delta else 1  # the merged token, and its rises and falls since the previous frame
        group = 1 if cfg.object_tokens else cfg.vit.token_dim // cfg.vit.dim  # patches whose features a token concatenates
        self.visual_aligner = make_aligner(cfg.visual_aligner, cfg.vit.dim * group * views, D)
        self.colour_stream = ColourStream(cfg.vit.patch_size, cfg.colour_stream) if cfg.colour_stream else None
        self.colour_aligner = make_aligner(cfg.visual_aligner, cfg.colour_stream * views * group, D) if cfg.colour_stream else None
        self.audio_aligner = make_audio_aligner(cfg.audio_aligner, cfg.audio.dim, D, cfg.audio.tokens_per_second, cfg.window,
                                                cfg.n_queries)
        self.segment_embed = SegmentEmbedding(cfg.max_segments, D)
        self.time_embed = TimeEmbedding(D) if cfg.time_embed else None
        if cfg.lora_r > 0:
            lora.inject(self.decoder, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        self.av_id = tok.token_id(AV)
        self.register_buffer("swap_ids", torch.tensor(tok.word_ids(cfg.swap_words), dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------------------------- encoders
    def encode_visual(self, frames_list, prev=None, split=True):
        """[uint8 (n_i, H, W, 3)] -> [(n_i, tokens_per_frame, D)] through the ViT and the aligner, all frames in one batch
        (split=False: one (sum n_i, tokens_per_frame, D) tensor). prev (visual_delta): each frame's predecessor in the
        batch (plan.predecessors) on the device; made here when None."""
        counts = [len(f) for f in frames_list]
        if sum(counts) == 0 or "v" not in self.cfg.modalities:
            x = torch.zeros(0, self.cfg.tokens_per_frame, self.cfg.decoder.dim, device=self.device)
            return [x] * len(counts) if split else x
        frames = torch.cat([f for f in frames_list if len(f)]).to(self.device)
        pixels = preprocess(frames, self.cfg.vit).to(self.dtype)
        if self.cfg.visual_delta and prev is None:
            prev = torch.as_tensor(predecessors(counts), device=self.device)

        merge = self.vit.merge  # per-patch features -> the frame's token(s): the merged grid, or its salient patches
        if self.cfg.object_tokens:
            idx = salient(pixels, prev, self.cfg.vit.grid, self.cfg.object_tokens)[..., None]
            merge = lambda h: h.gather(1, idx.expand(-1, -1, h.shape[-1]))  # noqa: E731

        def merged(h):  # the frame's token(s), with their rises and falls (visual_delta)
            if not self.cfg.visual_delta:
                return merge(h)
            d = h - h[prev]  # per-patch change since the previous frame (0 for a clip's first), rises and falls merged
            return torch.cat([merge(h), merge(d), merge(-d)], -1)

        seen = pixels  # the ViT's view: with the colour stream, a random colour mix per clip in training (colour.py)
        if self.colour_stream is not None and self.training and self.cfg.colour_mix > 0:
            seen = preprocess(colour_mixed(frames, [c for c in counts if c], self.cfg.colour_mix), self.cfg.vit).to(self.dtype)
        x = self.visual_aligner(merged(self.vit.patches(seen)))
        if self.colour_stream is not None:  # the colour part of the token: its own stream and aligner (colour.py)
            x = x + self.colour_aligner(merge(self.colour_stream(pixels, prev)))
        return list(x.split(counts)) if split else x

    def encode_audio(self, audio_list, plan=None, split=True):
        """[float (samples_i,)] at 16 kHz, or [audio.MelSegments] (log-mel already computed, e.g. by a data worker) ->
        [(tokens (l_i, D), start times (l_i,))] (split=False: all clips' tokens in one (sum l_i, D) tensor). Audio longer
        than the encoder's t_max is cut into segments (audio.mel_segments), encoded in one padded batch; the aligner reads
        each segment's own frames, all windows in one call (plan: plan.plan_av on the device says which rows; made here
        when None), and segment s > 0 adds its segment embedding."""
        D, acfg = self.cfg.decoder.dim, self.cfg.audio
        if "a" not in self.cfg.modalities or not audio_list:
            empty = torch.zeros(0, D, device=self.device)
            return [(empty, torch.zeros(0, device=self.device)) for _ in audio_list] if split else empty
        plan = plan or plan_av(Plan(), self, [[]] * len(audio_list), [[]] * len(audio_list), audio_list).to_device(self.device)
        d = plan.dev
        mels = [m for a in audio_list for m in (a if isinstance(a, MelSegments) else mel_segments(a, acfg)).mels]
        # native mode hides the batch padding from every clip; exact mode attends over its 30 s as Whisper was trained
        hidden = self.audio(mel_batch(mels, self.device, self.dtype), None if acfg.exact else [m.shape[-1] for m in mels])
        rows = hidden[d["au.piece"], d["au.frame"]]  # each segment trimmed to its own length, cut into windows
        if isinstance(self.audio_aligner, WindowQFormer):
            tokens = self.audio_aligner.attend(rows.masked_fill(d["au.pad"][..., None], 0.0), d["au.pad"])
        else:
            tokens = self.audio_aligner.net(rows)
        if plan.meta["au.later_segments"]:  # segment s > 0 adds its embedding (SegmentEmbedding), segment 0 nothing
            table = self.segment_embed.table
            tokens = tokens + torch.cat([torch.zeros_like(table[:1]), table[1:]])[d["au.segment"]]
        return list(zip(tokens.split(plan.meta["audio"]), d["au.times"].split(plan.meta["audio"]))) if split else tokens

    def av_block(self, frames_list, frame_times_list, audio_list, plan=None):
        """Per clip: interleaved content tokens (N, D), their times (N,) and modality (N,) (a plan.Block,
        which also carries the times on the host); and the OT loss (0 if off). The clock (time embedding) is
        added later, by layout.assemble. plan: this batch's plan.plan_av on the device (made here when None):
        every clip's order is one index into [all visual tokens; all audio tokens], applied by one gather."""
        if plan is None or "av" not in plan.meta:
            plan = plan_av(Plan(), self, frames_list, frame_times_list, audio_list).to_device(self.device)
        d = plan.dev
        v = self.encode_visual(frames_list, d.get("av.prev"), split=False).flatten(0, 1)
        a = self.encode_audio(audio_list, plan, split=False)
        ot = torch.zeros((), device=self.device)
        if self.cfg.ot_weight > 0 or self.cfg.ot_fusion:
            v, a, ot = self._ot(v, a, plan.meta)
        tokens = (torch.cat([v, a]) if len(v) and len(a) else v if len(v) else a)[d["av.index"]]
        n = plan.meta["av_counts"]
        blocks = Blocks(map(Block, tokens.split(n), d["av.times"].split(n), d["av.modality"].split(n), plan.meta["av_host"]))
        blocks.tokens = tokens
        return blocks, ot

    def _ot(self, v, a, meta):
        """LAVCap per clip: the OT loss (mean over clips with both streams) and, with ot_fusion, the fused tokens."""
        c, terms = self.cfg, []
        pairs = list(zip(v.split([n * c.tokens_per_frame for n in meta["frames"]]), a.split(meta["audio"])))
        for i, (vc, ac) in enumerate(pairs):
            if len(vc) and len(ac):
                terms += [ot_loss(vc, ac, c.ot_eps, c.ot_iters)] if c.ot_weight > 0 else []
                pairs[i] = ot_fuse(vc, ac, c.ot_eps, c.ot_iters) if c.ot_fusion else (vc, ac)
        ot = torch.stack(terms).mean() if terms else torch.zeros((), device=self.device)
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), ot

    # ----------------------------------------------------------------------------------- layout (the rest: captioner.py)
    def plan_layout(self, blocks, ids_list, loss_masks=None, left_pad=False):
        """The host half of layout(): a Plan (not yet copied) of prompt + AV block + caption (layout.plan_rows)."""
        return layout.plan_rows(Plan(), self, [host_view(b)[0] for b in blocks], ids_list, loss_masks, left_pad)

    def layout(self, blocks, ids_list, loss_masks=None, left_pad=False, plan=None):
        """Decoder inputs of prompt + AV block + caption (layout.assemble; plan: plan_layout's, on the device)."""
        return assemble(self, blocks, ids_list, loss_masks, left_pad, plan)

    def forward(self, frames, frame_times, audio, ids, loss_mask, return_hidden=False, ground=None):
        """A batch of clips with tokenised (prompt + caption) -> dict(loss, ce, ot, ground, n_tokens, n_seq).
        ground: per clip, grounding.spans() of its events (used when cfg.ground_weight > 0). The whole
        batch's layout (interleave order, rows, labels, grounding triples) is planned on the host first and
        copied once; n_tokens and n_seq are host ints, so the step never waits on the device."""
        ground = ground if ground is not None and self.cfg.ground_weight > 0 else None
        plan = plan_av(Plan(), self, frames, frame_times, audio)
        layout.plan_rows(plan, self, [t for t, _ in plan.meta["av_host"]], ids, loss_mask)
        if ground is not None:
            grounding.plan_triples(plan, self.tok, plan.meta["av_host"], ground)
        plan.to_device(self.device)
        blocks, ot = self.av_block(frames, frame_times, audio, plan)
        g = grounding.loss(self, blocks, ground, plan) if ground is not None else torch.zeros((), device=self.device)
        h, x = self.hidden_states(blocks, ids, loss_mask, self.cfg.word_dropout if self.training else 0.0, plan,
                                  self.cfg.word_swap if self.training else 0.0)
        return self.caption_loss(h, x, plan, ot, g, return_hidden)

