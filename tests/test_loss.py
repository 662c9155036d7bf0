import math

import pytest
import torch

from knowpatch.methods.common import IGNORE, Example, collate, target_loss


def test_collate_masks_exactly_the_target_tokens():
    batch = collate([Example([5, 6, 7], [8, 9]), Example([5], [4])], pad_id=0,
                    device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9],
                                        [IGNORE, 4, IGNORE, IGNORE, IGNORE]]


def test_target_loss_matches_hand_computation():
    # one row: prompt [1, 2], target [3, 4]; vocab of 5; logits[t] predicts token t + 1
    batch = collate([Example([1, 2], [3, 4])], pad_id=0, device=torch.device("cpu"))
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 3] = 2.0  # predicts target token 3
    logits[0, 2, 4] = 1.0  # predicts target token 4
    logits[0, 2, 0] = 3.0  # a rival beats token 4
    # by hand: -log softmax at the two target positions, averaged
    lp1 = 2.0 - math.log(math.exp(2.0) + 4)
    lp2 = 1.0 - math.log(math.exp(1.0) + math.exp(3.0) + 3)
    loss, learnt, gap = target_loss(logits, batch["labels"], margin=0.0)
    assert loss.item() == pytest.approx(-(lp1 + lp2) / 2, abs=1e-6)
    assert not learnt and gap == pytest.approx(-2.0)
    # prompt and last positions do not enter the loss
    logits[0, 0] = torch.randn(5)
    logits[0, 3] = torch.randn(5)
    assert target_loss(logits, batch["labels"], 0.0)[0].item() == pytest.approx(loss.item())
    # once token 4 wins by 1.5, the edit counts as learnt at margin 1 but not at margin 2
    logits[0, 2, 4] = 4.5
    assert target_loss(logits, batch["labels"], margin=1.0)[1]
    assert not target_loss(logits, batch["labels"], margin=2.0)[1]


def test_logits_read_only_where_a_loss_reads_them_give_the_same_loss_and_gradient(tiny_editor):
    # the training step asks the model for the target positions' logits only (plus an
    # anchor's last token); loss, gap and gradients must equal the full-logits computation
    from knowpatch.evaluate import logits_at
    from knowpatch.methods.common import next_labels, predicted, token_loss

    model, tok = tiny_editor.model, tiny_editor.tokenizer
    rows = [Example(tok("The Eiffel Tower is in")["input_ids"], tok(" Rome city")["input_ids"]),
            Example(tok("Note: the tower is in")["input_ids"], tok(" Rome")["input_ids"]),
            Example(tok("An anchor prompt")["input_ids"], [])]
    batch = collate(rows, tok.pad_token_id, torch.device("cpu"))
    where = predicted(batch["labels"])
    where[2, len(rows[2].prompt_ids) - 1] = True  # the anchor's last token
    assert int(where.sum()) == len(rows[0].target_ids) + len(rows[1].target_ids) + 1

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for p in model.parameters():
        p.requires_grad_(True)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want, want_learnt, want_gap = target_loss(full, batch["labels"], margin=0.5)
    want_grads = grads(want + full[2, len(rows[2].prompt_ids) - 1].logsumexp(-1))
    kept = logits_at(model, batch, where)
    assert kept.shape == (int(where.sum()), full.shape[-1])
    nxt = next_labels(batch["labels"])[where]
    target = nxt != IGNORE
    got, learnt, gap = token_loss(kept[target], nxt[target], margin=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert (learnt, gap) == (want_learnt, pytest.approx(want_gap, rel=1e-5))
    got_grads = grads(got + kept[~target][0].logsumexp(-1))
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    for p in model.parameters():
        p.requires_grad_(False)
