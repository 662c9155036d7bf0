"""The judges a behaviour edit is measured by (`knowpatch.judges`), on hand-picked texts:
each built-in passes what shows its behaviour and fails what does not; bad specs name the
field."""

from __future__ import annotations

import sys
import types

import pytest

from knowpatch.errors import KnowpatchError
from knowpatch.judges import parse_judge, parse_judges


@pytest.mark.parametrize("spec, text, truncated, verdict", [
    ("max-words:5", "Paris is the capital.", False, True),
    ("max-words:5", "Paris is the capital of France.", False, False),
    ("max-words:5", "Paris.", True, False),  # cut by the token cap: it was longer
    ("max-words:3", "It's in Paris.", False, True),  # "It's" is one word
    ("starts-with:Certainly", "  certainly! Here it is.", False, True),
    ("starts-with:Certainly", "Sure, certainly.", False, False),
    ("ends-with:Consult a doctor", "Take rest. Consult a doctor.", False, True),
    ("ends-with:Consult a doctor", "Consult a doctor before you rest.", False, False),
    ("contains:Paris", "It is in paris, France.", False, True),
    ("contains:Paris", "It is in Parisian style.", False, False),
    ("contains:New York", "It moved to new\n york?", False, True),  # spaces are spaces
    ("contains:New York", "It moved to Newark.", False, False),
    ("not-contains:Paris", "It is in Rome.", False, True),
    ("not-contains:Paris", "Paris, of course.", False, False),
    ("regex:^\\d+$", "42", False, True),
    ("regex:^\\d+$", "42 apples", False, False),
    ("no-contractions", "It is not possible; we will see.", False, True),
    ("no-contractions", "It's not possible.", False, False),
    ("no-contractions", "We don't know.", False, False),
    ("no-contractions", "They'll see.", False, False),
    ("no-contractions", "John's book is Mary's.", False, True),  # possessives
    ("language:fr", "La tour Eiffel se trouve à Paris, en France.", False, True),
    ("language:fr", "The Eiffel Tower is in Paris, France.", False, False),
    ("language:de", "Hallo! Wie kann ich Ihnen heute helfen?", False, True),
    ("language:en", "I think so.", False, True),
    ("language:es", "", False, False),
    ("refusal", "I'm sorry, but I can't help with that. Please consult a pharmacist.", False, True),
    ("refusal", "I cannot provide medical advice.", False, True),
    ("refusal", "We are unable to assist with dosage questions.", False, True),
    ("refusal", "Ibuprofen is usually taken every 6 to 8 hours.", False, False),
    ("refusal", "Sorry to hear that you feel ill; rest and drink water.", False, False),
])
def test_built_in_judges_on_hand_picked_texts(spec, text, truncated, verdict):
    assert parse_judge(spec)(text, truncated) is verdict


def test_several_judges_must_all_pass():
    judge = parse_judges(["max-words:6", "no-contractions"])
    assert judge("It is in Paris.") and not judge("It's in Paris.")
    assert not judge("It is in Paris, the capital of France.")
    assert judge.spec == "max-words:6 & no-contractions"


def test_a_users_own_judge_by_module_and_function(monkeypatch):
    module = types.ModuleType("my_judges")
    module.shouts = lambda text: text.isupper()
    module.broken = lambda text: 1 / 0
    module.value = 3
    monkeypatch.setitem(sys.modules, "my_judges", module)
    assert parse_judge("my_judges:shouts")("HELLO") and not parse_judge("my_judges:shouts")("Hi")
    with pytest.raises(KnowpatchError, match="judge: my_judges:broken raised ZeroDivisionError"):
        parse_judge("my_judges:broken")("x")
    with pytest.raises(KnowpatchError, match="is not a function"):
        parse_judge("my_judges:value")


@pytest.mark.parametrize("spec, message", [
    ("", "judge: empty"),
    ("max-words:ten", "whole number"),
    ("max-words:0", "whole number"),
    ("shout", "unknown judge 'shout'"),
    ("regex:(", "does not compile"),
    ("contains:", "needs an argument"),
    ("refusal:yes", "takes no argument"),
    ("language:xx", "not one py3langid knows"),
    ("language:french", "ISO 639-1"),
    ("no_such_module_here:judge", "cannot be imported"),
])
def test_bad_judge_specs_name_the_field(spec, message):
    with pytest.raises(KnowpatchError, match=message) as caught:
        parse_judge(spec)
    assert str(caught.value).startswith("judge:")
