"""What train_sft.py, train_dpo.py and train_grpo.py share (nanoGPT's train.py, split so no script imports another).

Argument groups (model / data / optimisation / run; each script adds its own flags to them), AdamW with
linear warm-up and cosine decay, the model from a preset, from three released towers (--vit/--audio/--llm) or from
`--init` (plus a LoRA), gradient checkpointing and the toy world built on first use. DDP, collectives
and autocast live in distributed.py.
"""
import argparse
import math
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from . import checkpoint, lora, toyworld
from .data import read_manifest
from .errors import InputError
from .omni_load import is_omni
from .model import PRESETS, AVCaptioner, preset
from .tokenizer import Tokenizer
from .weights import read_config

# Flags that name an AVConfig field. --init keeps the checkpoint's architecture (a different value is
# refused by name); the loss weights are this run's objective, so --init applies them.
ARCHITECTURE = ("interleave", "air", "chunk_seconds", "time_positions", "time_embed", "mask", "modalities", "ot_fusion", "fps",
                "max_frames", "visual_aligner", "visual_delta", "audio_aligner", "window", "n_queries",
                "colour_stream", "object_tokens")
LOSS_WEIGHTS = ("ot_weight", "ground_weight", "label_smoothing", "word_dropout", "word_swap", "colour_mix")


# ----------------------------------------------------------------------------------- arguments
def model_args(p, init=None, lora_r=0, lora_alpha=16.0, architecture=False):
    """architecture=True (SFT): the flags of a fresh model too; DPO and GRPO take theirs from --init."""
    g = p.add_argument_group("model")
    g.add_argument("--init", default=init, help="avnano checkpoint to start from (its architecture is kept)"
                   + ("; default: a fresh --preset" if init is None else ""))
    g.add_argument("--lora-r", type=int, default=lora_r, help="rank of a LoRA on the decoder, added when the model has "
                   "none (0 = none)")
    g.add_argument("--lora-alpha", type=float, default=lora_alpha, help="LoRA alpha (the update is scaled by alpha / r)")
    if architecture:
        g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size: tiny (CPU), small (CPU or GPU) or "
                       "gpu (~150-180M parameters, one H100)")
        g.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size of a fresh model's tokenizer")
        g.add_argument("--interleave", default="per_frame", choices=["concat", "per_frame", "avti", "chunked"], help="AV token order")
        g.add_argument("--air", type=float, default=0.25, help="AVTI audio-interleaving rate")
        g.add_argument("--chunk-seconds", type=float, default=2.0, help="chunk length of the chunked interleaver")
        g.add_argument("--time-positions", action="store_true", help="time-aligned position ids (Qwen2.5-Omni style)")
        g.add_argument("--time-embed", action=argparse.BooleanOptionalAction, default=True,
                       help="add the sinusoidal clock embedding to every AV token (ours)")
        g.add_argument("--visual-aligner", default="mlp", choices=["linear", "mlp"], help="visual aligner (AVicuna: linear)")
        g.add_argument("--visual-delta", action=argparse.BooleanOptionalAction, default=None,
                       help="the visual aligner also reads each frame's per-patch change (default: the preset's choice)")
        g.add_argument("--audio-aligner", default="qformer", choices=["linear", "mlp", "qformer"],
                       help="audio aligner (video-SALMONN 2: window Q-Former)")
        g.add_argument("--window", type=float, default=0.5, help="Q-Former window in seconds")
        g.add_argument("--n-queries", type=int, default=1, help="Q-Former queries per window")
        g.add_argument("--mask", default="prefix", choices=["prefix", "causal"], help="AVCap prefix mask M or plain causal")
        g.add_argument("--modalities", default="av", choices=["av", "v", "a"], help="audio+video, video only, audio only")
        g.add_argument("--ot-fusion", action="store_true", help="LAVCap OT-attention fusion before interleaving")
        g.add_argument("--fps", type=float, default=2.0, help="frames per second phi")
        g.add_argument("--max-frames", type=int, default=16, help="frame cap m")
        g.add_argument("--ot-weight", type=float, default=0.0, help="lambda of the LAVCap OT alignment loss (0 = off)")
        g.add_argument("--ground-weight", type=float, default=1.0, help="weight of the grounding loss (needs manifest "
                       "events; 0 = off)")
        g.add_argument("--label-smoothing", type=float, default=0.0, help="AVCap used 0.1")
        g.add_argument("--word-dropout", type=float, default=0.0, help="share of caption input tokens blanked in "
                       "training, so words come from the AV block, not from the words before (ours)")
        g.add_argument("--word-swap", type=float, default=None, help="share of the caption's colour words fed to the "
                       "decoder as a random colour in training (labels kept), so the shape is read from the video (ours; "
                       "default: the preset's, with --init the checkpoint's)")
        g.add_argument("--colour-stream", type=int, default=None, help="width of a shape-blind colour stream summed into "
                       "each visual token (avnano/colour.py; 0 = off; default: the preset's)")
        g.add_argument("--colour-mix", type=float, default=None, help="with the colour stream: share of training clips the "
                       "ViT sees through a random colour mix, so it learns shapes apart from colours (default: the preset's, "
                       "with --init the checkpoint's)")
        g.add_argument("--object-tokens", type=int, default=None, help="k > 0: each frame gives its k most salient "
                       "patches as tokens (colour contrast and change; avnano/vit.py salient) instead of the merged grid "
                       "(0 = off; default: the preset's)")
        g.add_argument("--vit", default=None, help="released SigLIP / CLIP directory (with --audio and --llm: a captioner "
                       "from released towers, fresh aligners, the LLM's tokenizer and chat template)")
        g.add_argument("--audio", default=None, help="released Whisper directory (its encoder half is used)")
        g.add_argument("--llm", default=None, help="released LlamaForCausalLM / Qwen2ForCausalLM directory (SmolLM2, "
                       "Qwen2.5) with its tokenizer.json")
        g.add_argument("--merge", type=int, default=None, help="merge each m x m group of ViT patches into one visual "
                       "token (tokens per frame = (grid / m)^2); default 2 for --vit (SigLIP-B/16 at 224 px: 14 x 14 "
                       "-> 49 tokens per frame), the preset's own otherwise")
        g.add_argument("--grad-checkpointing", action="store_true", help="recompute the decoder's and the encoders' "
                       "blocks in the backward instead of storing their activations (less memory, ~1.3x compute)")
    return g


def data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data/toyworld", help="directory with train.jsonl / test.jsonl (toy world made here if absent)")
    g.add_argument("--n-train", type=int, default=2000, help="toy world: training clips to generate")
    g.add_argument("--n-test", type=int, default=200, help="toy world: held-out clips to generate")
    return g


def opt_args(p, steps=1500, lr=2e-3, batch=16, warmup=50):
    """steps=None: the script has no step schedule of its own (DPO trains per round on its pairs)."""
    g = p.add_argument_group("optimisation")
    if steps is not None:
        g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
        g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
        g.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps")
    g.add_argument("--batch-size", type=int, default=batch, help="clips per micro-batch per rank")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--seed", type=int, default=0, help="model init and data order")
    return g


def run_args(p, out, save_every=None):
    g = p.add_argument_group("run")
    g.add_argument("--out", default=out, help="checkpoint directory")
    g.add_argument("--resume", action="store_true", help="continue from --out's checkpoint (model, optimizer, RNG, data position)")
    g.add_argument("--eval-n", type=int, default=200, help="held-out clips to evaluate")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    if save_every is not None:
        g.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps")
        g.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: a kill after this step
    return g


# ----------------------------------------------------------------------------------- data
def ensure_toy_world(args, rank):
    """Build the toy world under the default --data directory on first use; refuse one made by other code."""
    manifest = os.path.join(args.data, "train.jsonl")
    if os.path.exists(manifest):
        first = (read_manifest(manifest) or [{}])[0]  # a malformed row is named by read_manifest
        if "events" in first and first.get("world") != toyworld.VERSION:  # a toy world made by other code
            raise InputError(manifest, f"toy world version {first.get('world', 1)}, this avnano makes version "
                             f"{toyworld.VERSION} (rendering or caption grammar changed); delete {args.data} to rebuild it")
        return
    if args.data != "data/toyworld":
        raise InputError(args.data, "no train.jsonl (only the default --data directory is generated automatically)")
    if rank == 0:
        print(f"building the toy world in {args.data} ({args.n_train} train / {args.n_test} test clips)", flush=True)
        toyworld.build(args.data, args.n_train, args.n_test, seed=0)
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------- model and optimizer
def add_lora(model, r, alpha):
    """A fresh rank-r LoRA on the decoder unless it has one (recorded in the config: checkpoints reload with it)."""
    if model.cfg.lora_r == 0 and r > 0:
        model.cfg.lora_r, model.cfg.lora_alpha = r, alpha
        lora.inject(model.decoder, model.cfg.lora_targets, r, alpha, model.cfg.lora_dropout)


def policy_lora(model, r, alpha, resume=False):
    """The adapter DPO / GRPO train, everything else frozen. A new run folds an adapter the checkpoint
    already has (an SFT run with --lora-r) into the base weights first, so the reference (the model with
    its adapters off) is the starting policy itself, and the new adapter has the asked rank and alpha.
    A resumed run keeps its checkpoint's adapter: its base already holds the folded one."""
    if model.cfg.lora_r and not resume:
        lora.restart(model.decoder, r, alpha, model.cfg.lora_dropout)
        model.cfg.lora_r, model.cfg.lora_alpha = r, alpha
    add_lora(model, r, alpha)
    model.set_trainable({"lora"})
    for k in ("word_dropout", "word_swap", "colour_mix"):  # SFT's input perturbations off: log-probs of what was written
        if hasattr(model.cfg, k):
            setattr(model.cfg, k, 0.0)


def build_model(args, train_rows, parser):
    """A fresh --preset model with a BPE tokenizer trained on the captions, or --init's checkpoint with the
    loss weights and --lora-r applied; a model flag --init cannot apply is refused by name."""
    torch.manual_seed(args.seed)
    if (model := released_model(args)) is not None:
        return model
    if not args.init:
        tok = Tokenizer.train([r["caption"] for r in train_rows] + ["Describe the clip."], vocab_size=args.vocab)
        cfg = preset(args.preset, tok.vocab_size, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                     **{k: getattr(args, k) for k in ARCHITECTURE + LOSS_WEIGHTS if getattr(args, k) is not None})
        if args.merge and cfg.object_tokens:
            parser.error("--merge: a frame's tokens are its --object-tokens salient patches; add --object-tokens 0 to merge")
        if args.merge:
            try:
                cfg = replace(cfg, vit=replace(cfg.vit, merge=args.merge))
            except ValueError as e:
                parser.error(f"--{e} of the {args.preset} preset")
        return AVCaptioner(cfg, tok)
    if is_omni(read_config(args.init)):  # a released Qwen2.5-Omni thinker, read straight onto the device
        return released_omni(checkpoint.load_model(args.init, device=args.device), args, parser)
    model = checkpoint.load_model(args.init)
    cfg, ref = model.cfg, preset(args.preset, model.cfg.decoder.vocab_size)
    theirs = {k: getattr(cfg, k) for k in ARCHITECTURE}
    theirs["preset"] = args.preset if (ref.vit, ref.audio, ref.decoder) == (cfg.vit, cfg.audio, cfg.decoder) else "another size"
    theirs["vocab"] = "its own tokenizer"
    theirs["merge"] = cfg.vit.merge
    theirs["lora_r"] = cfg.lora_r or args.lora_r  # a checkpoint without a LoRA gets one
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {v})" for k, v in theirs.items()
             if getattr(args, k) != parser.get_default(k) and getattr(args, k) != v]
    if clash:
        raise InputError(args.init, "--init keeps the checkpoint's architecture; cannot apply " + ", ".join(clash))
    for k in LOSS_WEIGHTS:  # a flag left unset (None: --word-swap, --colour-mix) keeps the checkpoint's value
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    add_lora(model, args.lora_r, args.lora_alpha)
    return model


def released_omni(model, args, parser):
    """--init with a Qwen2.5-Omni directory (bfloat16 weights on CUDA, float32 on the CPU; what trains is float32:
    Captioner.set_trainable): its architecture is the checkpoint's; label smoothing, word dropout and --lora-r apply.
    Refused by name when not at the parser's default: an architecture flag; --ot-weight and --ground-weight (the thinker
    has no OT loss and no grounding head: the scripts' default --ground-weight 1.0 is fine, any other value is refused);
    --word-swap (not applied to the thinker)."""
    given = [f"--{k.replace('_', '-')}" for k in ARCHITECTURE + ("preset", "vocab", "merge", "ot_weight", "ground_weight", "word_swap",
                                                           "colour_mix") if hasattr(args, k) and getattr(args, k) != parser.get_default(k)]
    if given:
        raise InputError(args.init, f"a Qwen2.5-Omni thinker keeps its own architecture; cannot apply {', '.join(given)}")
    model.cfg.label_smoothing, model.cfg.word_dropout = args.label_smoothing, args.word_dropout
    add_lora(model, args.lora_r, args.lora_alpha)
    return model.train()


def set_grad_checkpointing(model, on=True):
    """Checkpoint every block of the decoder, the ViT and the audio encoder (used only when training)."""
    for tower in (model.decoder, model.vit, model.audio):
        tower.grad_checkpointing = on


def released_model(args):
    """--vit/--audio/--llm: the three released towers, fresh aligners, the architecture flags applied."""
    given = [f"--{k}" for k in ("vit", "audio", "llm") if getattr(args, k)]
    if args.init and given:
        raise InputError(args.init, f"--init keeps the checkpoint's towers; cannot also load {', '.join(given)}")
    if len(given) not in (0, 3):
        missing = [f"--{k}" for k in ("vit", "audio", "llm") if not getattr(args, k)]
        raise InputError(", ".join(given), "released towers need all three of --vit, --audio and --llm "
                         f"({', '.join(missing)} missing)")
    if not given:
        return None
    merge = args.merge or 2  # SigLIP-B/16 at 224 px: 49 tokens per frame
    overrides = {k: getattr(args, k) for k in ARCHITECTURE + LOSS_WEIGHTS if getattr(args, k) is not None}
    model = checkpoint.released_captioner(args.vit, args.audio, args.llm, merge=merge, lora_r=args.lora_r,
                                          lora_alpha=args.lora_alpha, **overrides)
    model.render("")  # a chat template avnano cannot render stops the run here, naming its file
    return model.train()


def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def set_lr(optimizer, step, args):
    """Linear warm-up, then cosine from args.lr down to lr * min_lr_ratio; set on every group and returned."""
    if step < args.warmup:
        lr = args.lr * (step + 1) / args.warmup
    else:
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
