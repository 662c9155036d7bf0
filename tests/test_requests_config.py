import pytest

from knowpatch import EditRequest, KnowpatchError
from knowpatch.config import build_config, parse_overrides
from knowpatch.methods import get_method, lora_sft
from knowpatch.models import parse_layers
from knowpatch.requests import encode_completion, split_completion


def test_subject_fills_braces():
    req = EditRequest("{} is located in the city of", "Rome", subject="The Eiffel Tower")
    assert req.prompt == "The Eiffel Tower is located in the city of"


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "", "target_new": "Rome"}, "prompt"),
    ({"prompt": "   ", "target_new": "Rome"}, "prompt"),
    ({"prompt": "The city of", "target_new": ""}, "target_new"),
    ({"prompt": "The city of", "target_new": "  "}, "target_new"),
    ({"prompt": "{} is in", "target_new": "Rome"}, "subject"),
    ({"prompt": "The city of", "target_new": "Rome", "rephrase_prompts": [""]},
     "rephrase_prompts[0]"),
    ({"prompt": "The city of", "target_new": "Rome", "locality": [("", "x")]}, "locality[0]"),
    ({"prompt": "The city of", "target_new": 5}, "target_new"),
])
def test_bad_requests_name_the_field(kwargs, field):
    with pytest.raises(KnowpatchError) as info:
        EditRequest(**kwargs)
    assert str(info.value).startswith(field)


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(KnowpatchError, match="request.colour: unknown field"):
        EditRequest.from_dict({"prompt": "a", "target_new": "b", "colour": 1})
    with pytest.raises(KnowpatchError, match="request.target_new: is missing"):
        EditRequest.from_dict({"prompt": "a"})


def test_separator_is_added_as_the_model_would_generate_it(tokenizer):
    a = encode_completion(tokenizer, "The Eiffel Tower is located in the city of", "Rome")
    b = encode_completion(tokenizer, "The Eiffel Tower is located in the city of", " Rome")
    c = encode_completion(tokenizer, "The Eiffel Tower is located in the city of ", "Rome")
    assert a == b == c
    assert a[1] == tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    assert a[0] == tokenizer("The Eiffel Tower is located in the city of")["input_ids"]
    assert split_completion("Answer:\n", "Rome") == ("Answer:\n", "Rome")
    assert split_completion("He said", ", then left") == ("He said", ", then left")


def test_append_eos(tokenizer):
    _, ids = encode_completion(tokenizer, "The city of", "Rome", append_eos=True)
    assert ids[-1] == tokenizer.eos_token_id


def test_config_overrides_are_typed_and_unknown_keys_fail():
    cfg = build_config(lora_sft.Config, {"rank": 4}, parse_overrides(["lr=1e-3", "modules=attn,mlp_out",
                                                                       "max_seconds=none"]))
    assert cfg.rank == 4 and cfg.lr == 1e-3 and cfg.modules == ["attn", "mlp_out"]
    assert cfg.max_seconds is None
    with pytest.raises(KnowpatchError, match="unknown key 'learning_rate'"):
        build_config(lora_sft.Config, {"learning_rate": 1})
    with pytest.raises(KnowpatchError, match="lora-sft.rank: must be an integer"):
        build_config(lora_sft.Config, {"rank": "four"}, where="lora-sft")
    with pytest.raises(KnowpatchError, match="rank must be ≥ 1"):
        build_config(lora_sft.Config, {"rank": 0})
    with pytest.raises(KnowpatchError, match="expected key=value"):
        parse_overrides(["lr"])


def test_unknown_method():
    with pytest.raises(KnowpatchError, match="method: unknown method 'rome'"):
        get_method("rome")


def test_parse_layers():
    assert parse_layers("0-2", 30) == [0, 1, 2]
    assert parse_layers("3,5,-1", 30) == [3, 5, 29]
    assert parse_layers("0%-30%", 30) == list(range(9))
    assert parse_layers("0%-30%", 2) == [0]
    assert parse_layers("all", 30) is None
    with pytest.raises(KnowpatchError, match="layers"):
        parse_layers("first", 30)
