"""DPO-family and GRPO losses against hand-computed values on 2-example batches; rewards on hand-made cases."""
import math

import pytest
import torch

from avnano.dpo import dpo_loss, guided_dpo_loss, select_pairs
from avnano.grpo import clipped_surrogate, group_advantages, grpo_loss, kl_k3, normalise, up_to_eos
from avnano.layout import assemble
from avnano.rewards import checklist_reward, dialogue_reward, edit_similarity, length_reward, total_reward

T = torch.tensor
PI_C, PI_R, REF_C, REF_R = T([-10.0, -12.0]), T([-11.0, -9.0]), T([-10.5, -12.0]), T([-10.5, -10.0])  # Delta = +1, -1


def test_dpo_sigmoid_cdpo_ipo_by_hand():
    loss, rc, rr = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    assert torch.allclose(loss, T([math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.1))]))  # 0.6444, 0.7444
    assert torch.allclose(rc, T([0.05, 0.0])) and torch.allclose(rr, T([-0.05, 0.1]))
    cdpo, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, kind="cdpo", eps=0.1)
    assert torch.allclose(cdpo, T([0.9 * 0.644397 + 0.1 * 0.744397, 0.9 * 0.744397 + 0.1 * 0.644397]), atol=1e-5)
    ipo, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, kind="ipo", n_c=T([5.0, 4.0]), n_r=T([2.0, 5.0]))
    assert torch.allclose(ipo, T([(0.35 - 5) ** 2, (-0.2 - 5) ** 2]))  # per-token averaged log-ratios
    with pytest.raises(ValueError):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, kind="hinge")


def test_guided_dpo_adds_ce_on_the_ground_truth_sequence():
    dpo, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    total = guided_dpo_loss(dpo, gt_logprob_sum=T([-6.0, -4.0]), gt_tokens=T([3.0, 2.0]), lam=0.1)
    assert torch.allclose(total, T((0.644397 + 0.744397) / 2 + 0.1 * 2.0), atol=1e-5)


def test_pair_selection_thresholds():
    scored = [[("good", dict(total=0.1, repetition=0.0)), ("bad", dict(total=0.5, repetition=0.02))],
              [("a", dict(total=0.2, repetition=0.05)), ("b", dict(total=0.3, repetition=0.0))],  # chosen repeats more
              [("x", dict(total=0.3, repetition=0.0)), ("y", dict(total=0.32, repetition=0.0))]]  # margin too small
    assert select_pairs(scored, {"total": 0.05, "repetition": 0.01}) == [(0, "good", "bad")]
    assert select_pairs(scored, {"total": 0.05, "repetition": -0.1}) == [(0, "good", "bad"), (1, "a", "b")]


def test_group_advantages_with_a_zero_spread_group():
    r = T([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    a = group_advantages(r)
    assert torch.allclose(a[0], T([-1.0, 0.0, 1.0]) / (1.0 + 1e-4)) and torch.equal(a[1], torch.zeros(3))
    assert torch.equal(group_advantages(r, scale="none"), T([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_k3_kl_nonnegative_and_zero_at_reference():
    torch.manual_seed(1)
    logp, ref = torch.randn(4, 6), torch.randn(4, 6)
    assert (kl_k3(logp, ref) >= 0).all() and torch.equal(kl_k3(logp, logp), torch.zeros(4, 6))
    assert torch.allclose(kl_k3(T([0.0]), T([math.log(2)])), T([2 - math.log(2) - 1]))


def test_clipped_surrogate_by_hand():
    logp = T([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]])
    adv = T([[1.0], [-1.0], [1.0], [-1.0]])
    loss = clipped_surrogate(logp, torch.zeros(4, 1), adv, eps_low=0.2)
    assert torch.allclose(loss.flatten(), T([-1.2, 1.5, -0.5, 0.8]))
    high = clipped_surrogate(logp[:1], torch.zeros(1, 1), adv[:1], eps_low=0.2, eps_high=0.28)
    assert torch.allclose(high, T([[-1.28]]))


def test_normalisation_modes_by_hand():
    per_token = T([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert normalise(per_token, mask, "grpo").item() == 3.0  # (6/3 + 4/1) / 2
    assert normalise(per_token, mask, "bnpo").item() == 2.5 == normalise(per_token, mask, "dapo").item()  # 10 / 4
    assert normalise(per_token, mask, "dr_grpo").item() == 1.25  # 10 / (2 * 4)
    # one step per batch: pi_old == pi and pi == ref -> loss = -(mean advantage) exactly, KL 0
    logp = torch.randn(2, 4)
    loss = grpo_loss(logp, logp, logp, T([0.5, -1.5]), mask, beta=0.04, mode="grpo")
    assert torch.allclose(loss, T(-(0.5 - 1.5) / 2))


def test_completion_includes_first_eos_only():
    rows = [[5, 7, 2, 9, 2], [2, 1, 1, 1, 1], [4, 4, 4, 4, 4], [3, 0, 1]]
    assert up_to_eos(rows, [2, 0]) == [[5, 7, 2], [2], [4, 4, 4, 4, 4], [3, 0]]


def test_dialogue_reward_cases():
    gt = [("A", "hello there"), ("B", "good morning")]
    assert dialogue_reward(gt, gt) == 1.0
    assert dialogue_reward(gt[::-1], gt) == pytest.approx(0.5)  # order matters: only one pair can keep order
    sim = edit_similarity("hello thxxe", "hello there")
    assert sim == pytest.approx(1 - 2 / 11)
    assert dialogue_reward([("A", "hello thxxe")], gt[:1]) == pytest.approx((1 + sim) / 2)
    assert dialogue_reward([("A", "zzzzzzzzzzz")], gt[:1]) == 0.0  # below the 0.6 similarity threshold
    assert dialogue_reward([("B", "hello there")], gt[:1]) == pytest.approx(0.5)  # wrong speaker: (0 + 1) / 2
    assert dialogue_reward([], []) == 1.0 and dialogue_reward([], gt) == 0.0 and dialogue_reward(gt, []) == 0.0
    assert dialogue_reward(gt[:1], gt) == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 1, R 1/2


def test_length_and_checklist_rewards():
    words = lambda n: " ".join(["w"] * n)
    assert [length_reward(words(n), 10) for n in (5, 10, 15, 20, 25)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    items = ["a knock at 1.0 s.", "a red circle appears at 2.0 s."]
    assert checklist_reward("A knock at 1.0 s.  a blue circle appears at 2.0 s.", items) == 0.5
    assert checklist_reward("anything", items, judge=lambda c, i: 1.0) == 1.0
    r, parts = total_reward("a knock at 1.0 s.", items, [], [], max_words=10, weights=(1.0, 1.0, 0.0))
    assert parts == {"r_c": 0.5, "r_d": 1.0, "r_l": 1.0} and r == 1.5


@pytest.mark.parametrize("iterations", [1, 3])
def test_grpo_inner_steps_move_the_policy_along_the_advantages(iterations):
    """GRPO's mu: the first step sees ratio 1 (loss 0 for advantages that sum to 0); later steps see the
    moved policy; the completion with the positive advantage gains log-probability, the other loses."""
    import types

    from tests.test_model import batch, tiny
    from avnano import lora
    from avnano.training import add_lora
    from train_grpo import policy_steps
    model = tiny()
    args = types.SimpleNamespace(iterations=iterations, temperature=1.0, beta=0.0, clip_eps=0.2, clip_eps_high=None,
                                 norm="grpo", grad_clip=1.0)
    add_lora(model, 4, 8.0)
    model.set_trainable({"lora"})
    torch.manual_seed(0)
    blocks = model.av_block(*batch())[0][:1] * 2  # one clip, two sampled captions
    completions = [model.completion_ids("a red circle appears at 0.5 s."), model.completion_ids("a knock at 2.0 s.")]
    adv = T([1.0, -1.0])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        before, mask = model.completion_logprobs(blocks, completions)
        with lora.disabled(model):
            ref, _ = model.completion_logprobs(blocks, completions)
    first_loss, kl, ratio_dev, _, _ = policy_steps(model, opt, blocks, completions, adv, ref, args)
    with torch.no_grad():
        after, _ = model.completion_logprobs(blocks, completions)
    assert abs(first_loss) < 1e-6 and abs(kl) < 1e-6  # a fresh LoRA (B = 0) is the reference
    assert (ratio_dev > 0) == (iterations > 1)
    gain = ((after - before) * mask).sum(-1)
    assert gain[0] > 0 > gain[1]


def test_a_sampled_av_token_in_a_completion_is_scored_like_any_token():
    # GRPO once died at step 111 when a sampled caption contained <|av|>: only the prompt's is spliced
    from tests.test_model import batch, tiny
    model = tiny()
    blocks = model.av_block(*batch())[0][:1] * 2
    plain = model.completion_ids("a red circle appears at 0.5 s.")
    odd = plain[:3] + [model.av_id] + plain[3:]
    with torch.no_grad():
        lp, mask = model.completion_logprobs(blocks, [plain, odd])
    assert mask[1].sum() == len(odd) and torch.isfinite(lp[1][mask[1] > 0]).all()
    assert torch.allclose(lp[0, :3], lp[1, :3], atol=1e-5)  # causal: the tokens before it are unchanged
    with pytest.raises(ValueError, match="no <\\|av\\|> placeholder"):
        assemble(model, blocks[:1], [plain])


def test_preference_runs_on_a_lora_checkpoint_take_it_as_their_reference():
    # DPO / GRPO once kept training an SFT checkpoint's own LoRA, and their reference (adapters off) was then the
    # model *before* SFT; now the SFT adapter is folded into the base and a fresh adapter of the asked rank starts
    from tests.test_model import batch, tiny
    from avnano import lora
    from avnano.training import policy_lora
    model = tiny(lora_r=8).eval()
    with torch.no_grad():
        for m in lora.adapters(model):
            m.lora_B.normal_(0, 0.05)  # a trained SFT adapter
        blocks = model.av_block(*batch())[0]
        comps = [model.completion_ids("a red circle appears at 0.5 s.")] * len(blocks)
        sft, _ = model.completion_logprobs(blocks, comps)
        with lora.disabled(model):
            pre_sft, _ = model.completion_logprobs(blocks, comps)
    assert not torch.allclose(sft, pre_sft, atol=1e-4)
    policy_lora(model, 4, 8.0)
    with torch.no_grad():
        policy, _ = model.completion_logprobs(blocks, comps)
        with lora.disabled(model):
            ref, _ = model.completion_logprobs(blocks, comps)
    assert torch.allclose(policy, sft, atol=1e-5) and torch.allclose(ref, sft, atol=1e-5)
    adapters = lora.adapters(model)
    assert adapters and all(m.r == 4 and m.scale == 2.0 and not m.lora_B.any() for m in adapters)
    assert (model.cfg.lora_r, model.cfg.lora_alpha) == (4, 8.0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_preference_runs_turn_sfts_input_perturbations_off():
    # an SFT model trained with colour words swapped and colour-mixed ViT views (--word-swap, --colour-mix): a DPO /
    # GRPO policy in train mode must score its samples as written, the same at every call
    from tests.test_model import batch, tiny
    from avnano.training import policy_lora
    model = tiny(colour_stream=8, colour_mix=1.0, word_swap=1.0).train()
    frames, times, audio = batch()
    with torch.no_grad():
        assert not torch.equal(model.av_block(frames, times, audio)[0].tokens, model.av_block(frames, times, audio)[0].tokens)
        policy_lora(model, 4, 8.0)
        assert (model.cfg.word_swap, model.cfg.colour_mix, model.cfg.word_dropout) == (0.0, 0.0, 0.0)
        assert torch.equal(model.av_block(frames, times, audio)[0].tokens, model.av_block(frames, times, audio)[0].tokens)
