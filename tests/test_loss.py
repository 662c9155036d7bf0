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
