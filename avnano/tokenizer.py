"""Tokenizer over the `tokenizers` library: released tokenizer.json files, a small byte-level BPE for the
toy world, and the ChatML template with its loss mask.

ChatML (used by SmolLM2 and Qwen2): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, and
`<|im_start|>assistant\\n` opens the reply. Prompt and completion are rendered *together* as one
string and tokenised once; the loss mask is then read off the character offsets, so it covers exactly
the completion and its `<|im_end|>` and no boundary merge or duplicated system prompt can creep in.
We do not run the Jinja chat templates (that would need jinja2); we read them. A released tokenizer's
template (tokenizer_config.json "chat_template", or chat_template.jinja) must be ChatML, else render()
refuses, naming the file (Llama-3 style headers are not rendered). A ChatML template's default system
prompt (Qwen2: "You are a helpful assistant.", SmolLM2: "You are a helpful AI assistant named SmolLM...",
added when the messages have no system message) is read off its string literal and rendered first, as
transformers' apply_chat_template does. A tokenizer with the ChatML tokens and no template (the toy
world's BPE) gets ChatML without a system prompt; any other is used without a template. With ChatML the
completion ends with <|im_end|> whatever eos_token the config names (base Qwen2.5 / SmolLM2 name
<|endoftext|>); generation stops at either.
"""
import os
import re

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import InputError
from .weights import read_config, write_json_atomic

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AV = "<|av|>"  # placeholder the AV model replaces with the interleaved audio-visual token block
SPECIALS = [EOT, IM_START, IM_END, "<|pad|>", AV]


# a ChatML system turn spelled out in one template string literal, or as template text right after a tag (the
# Qwen2.5-Omni template: `{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful
# assistant.<|im_end|>`): its text is the default system prompt
DEFAULT_SYSTEM = re.compile(r"""(?:['"]|%\})<\|im_start\|>system(?:\n|\\n)([^'"{}]*?)<\|im_end\|>""")


def read_chat_template(folder, config):
    """(template text, file it came from): the tokenizer_config.json's (dict `config`) "chat_template" (a
    string, or a list of named templates: "default"), else chat_template.jinja, else chat_template.json; (None, None)
    when none."""
    t = config.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if t:
        return t, os.path.join(folder, "tokenizer_config.json")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    as_json = os.path.join(folder, "chat_template.json")  # {"chat_template": "..."} (Qwen2.5-Omni's processor files)
    if os.path.exists(as_json) and isinstance(t := read_config(as_json).get("chat_template"), str):
        return t, as_json
    return None, None


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token=None, chat_template=None, template_file="chat template"):
        self.tok = tok
        self.chat_template, self.system, self.template_error = chat_template, None, None
        self.chat = tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None
        if chat_template is not None:
            if not self.chat or IM_START not in chat_template or IM_END not in chat_template:
                self.chat = False
                self.template_error = (template_file, "the chat template is not ChatML (<|im_start|>role ... <|im_end|>); "
                                       "avnano renders ChatML only (SmolLM2, Qwen2). Use an LLM with a ChatML template, "
                                       "or remove the template to caption without one")
            elif m := DEFAULT_SYSTEM.search(chat_template):
                self.system = m.group(1).replace("\\n", "\n")
        self.eos_token = IM_END if self.chat else (eos_token or EOT)
        if tok.token_to_id(self.eos_token) is None:
            raise ValueError(f"tokenizer has no end token {self.eos_token!r}")
        # generation stops at the template's end, at end-of-text and at the config's eos, whichever comes first
        self.eos_ids = sorted({i for i in map(tok.token_to_id, (self.eos_token, EOT, eos_token or EOT)) if i is not None})
        pad = tok.token_to_id("<|pad|>")
        self.pad_id = pad if pad is not None else self.eos_ids[0]

    @classmethod
    def from_file(cls, path):
        """A tokenizer.json, or a directory holding one (its tokenizer_config.json may name the eos and
        carry the chat template)."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise InputError(file, "no tokenizer.json")
        folder = os.path.dirname(file)
        config_file = os.path.join(folder, "tokenizer_config.json")
        config = read_config(config_file) if os.path.exists(config_file) else {}
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        template, source = read_chat_template(folder, config)
        return cls(HFTokenizer.from_file(file), eos, template, source)

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
        config = {"eos_token": self.eos_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template  # a checkpoint renders as its LLM did
        write_json_atomic(config, os.path.join(path, "tokenizer_config.json"))

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

    def word_ids(self, words):
        """Ids of the words that are a single token where a caption has them (after a space); others are left out."""
        return [ids[0] for w in words if len(ids := self.encode(" " + w)) == 1]

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages, completion=None):
        """messages: [{"role", "content"}]; returns (ids, loss_mask). With completion=None the text ends
        with the generation prompt (ready to sample); otherwise the completion and its end token follow
        and loss_mask is 1 exactly on them. Without ChatML tokens: plain concatenation of contents."""
        if self.template_error:
            raise InputError(*self.template_error)
        if self.chat:
            if self.system is not None and messages[:1] and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system}] + list(messages)
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
