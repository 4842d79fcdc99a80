"""Tokenizer over the `tokenizers` library: released tokenizer.json files, a small byte-level BPE for the
toy world, and the ChatML template with its loss mask.

ChatML (used by SmolLM2 and Qwen2): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and
`<|im_start|>assistant\\n` opens the reply. Prompt and completion are rendered *together* as one
string and tokenised once; the loss mask is then read off the character offsets, so it covers exactly
the completion and its `<|im_end|>` and no boundary merge or duplicated system prompt can creep in.
We do not run the Jinja chat templates of tokenizer_config.json (that would need jinja2): a tokenizer
whose vocabulary has the ChatML tokens gets ChatML, any other is used without a template.
"""
import json
import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AV = "<|av|>"  # placeholder the AV model replaces with the interleaved audio-visual token block
SPECIALS = [EOT, IM_START, IM_END, "<|pad|>", AV]


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token=None):
        self.tok = tok
        self.chat = tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None
        self.eos_token = eos_token or (IM_END if self.chat else EOT)
        if tok.token_to_id(self.eos_token) is None:
            raise ValueError(f"tokenizer has no end token {self.eos_token!r}")
        # generation stops at the template's end *and* at end-of-text, whichever comes first
        self.eos_ids = sorted({i for i in (tok.token_to_id(self.eos_token), tok.token_to_id(EOT)) if i is not None})
        pad = tok.token_to_id("<|pad|>")
        self.pad_id = pad if pad is not None else self.eos_ids[0]

    @classmethod
    def from_file(cls, path):
        """A tokenizer.json, or a directory holding one (its tokenizer_config.json may name the eos)."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        eos = None
        config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.exists(config):
            with open(config) as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        return cls(HFTokenizer.from_file(file), eos)

    @classmethod
    def train(cls, texts, vocab_size=512):
        """Byte-level BPE (GPT-2 style: any byte string is encodable, decode inverts encode)."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": self.eos_token}, f)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def token_id(self, token):
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages, completion=None):
        """messages: [{"role", "content"}]; returns (ids, loss_mask). With completion=None the text ends
        with the generation prompt (ready to sample); otherwise the completion and its end token follow
        and loss_mask is 1 exactly on them. Without ChatML tokens: plain concatenation of contents."""
        if self.chat:
            text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
            text += f"{IM_START}assistant\n"
        else:
            text = "".join(m["content"] for m in messages)
        start = len(text)
        if completion is not None:
            text += completion + self.eos_token
        enc = self.tok.encode(text, add_special_tokens=False)
        mask = [int(completion is not None and s >= start and e > s) for s, e in enc.offsets]
        return enc.ids, mask
