"""Tokenizer: BPE training, round trip, ChatML template loss mask, stopping at the template end token;
sample.py's text mode end to end."""
import pytest
import torch

from avnano.decoder import Decoder, DecoderConfig
from avnano.generate import generate
from avnano.tokenizer import IM_END, Tokenizer
from tests.helpers import run_script
CORPUS = ["a red circle moves left at 1.5 s.", "a knock at 2.0 s.", "speaker A says \"hello there\".",
          "a blue square appears at 0.5 s and a rising chirp plays."] * 20


def tok():
    return Tokenizer.train(CORPUS, vocab_size=300)


def test_round_trip_and_specials():
    t = tok()
    for text in CORPUS[:4] + ["ünïcödé and unseen words 123", ""]:
        assert t.decode(t.encode(text)) == text
    assert t.chat and t.eos_ids == sorted([t.token_id(IM_END), t.token_id("<|endoftext|>")])


def test_template_loss_mask_is_exactly_completion_plus_end(tmp_path):
    t = tok()
    msgs = [{"role": "system", "content": "You caption clips."}, {"role": "user", "content": "Describe it."}]
    ids, mask = t.render(msgs, completion="a knock at 2.0 s.")
    prompt_ids, prompt_mask = t.render(msgs)
    assert ids[:len(prompt_ids)] == prompt_ids and sum(prompt_mask) == 0
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert ids[-1] == t.token_id(IM_END)
    assert t.decode([i for i, m in zip(ids, mask) if m]) == "a knock at 2.0 s."
    text = t.decode(ids, skip_special=False)
    assert text.count("You caption clips.") == 1 and text.count("<|im_start|>system") == 1
    t.save(tmp_path)
    again = Tokenizer.from_file(str(tmp_path))
    assert again.render(msgs, "x") == t.render(msgs, "x") and again.eos_ids == t.eos_ids


def test_generation_stops_at_template_end():
    t = tok()
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=t.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32))
    end = t.token_id(IM_END)
    with torch.no_grad():  # make <|im_end|> the only sensible next token
        model.embed.weight[end] = 0
        model.embed.weight[end, 0] = 50.0
        model.norm.weight.fill_(1.0)
        for b in model.blocks:
            b.mlp.down_proj.weight.zero_()
            b.attn.o_proj.weight.zero_()
        model.embed.weight[:, 0].clamp_(max=0.01)
        model.embed.weight[end, 0] = 50.0
    ids, _ = t.render([{"role": "user", "content": "hi"}])
    out = generate(model, torch.tensor([ids]), max_new_tokens=10, eos_ids=t.eos_ids, pad_id=t.pad_id)
    assert out.shape[1] < 10 and out[0, -1] == end


def test_sample_py_streams_the_reference_greedy_reply(tmp_path):
    """`sample.py --llm DIR --prompt ...` on a released-format directory prints what transformers'
    greedy generate continues the ChatML prompt with."""
    transformers = pytest.importorskip("transformers")
    t = tok()
    t.save(tmp_path)
    cfg = transformers.LlamaConfig(vocab_size=t.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    ids, _ = t.render([{"role": "user", "content": "a knock"}])
    new = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
                      do_sample=False, eos_token_id=t.eos_ids, pad_token_id=t.pad_id)[0, len(ids):].tolist()
    want = t.decode([i for i in new if i not in t.eos_ids and i != t.pad_id])
    out = run_script("sample.py", "--llm", tmp_path, "--prompt", "a knock", "--max-new-tokens", 12, "--device", "cpu", timeout=120)
    printed = out.stdout[:-1]  # the final newline
    # all of the reply is streamed except an incomplete UTF-8 character at its very end, held back
    assert printed.strip() and want.startswith(printed) and want[len(printed):].strip("\ufffd") == ""
