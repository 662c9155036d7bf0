"""A fact asked as a question: how people use an instruct model, and what a chat probe asks.

    questions_for(request)            # ["Which continent is Angola located in?", ...]
    chat_prompt(tokenizer, question)  # the question as a user turn of the model's template

CounterFact records carry a Wikidata relation id (P17 country, P27 citizenship, ...); each
relation has a few phrasings of its question here, written for this project. zsRE and
MQuAKE records bring their own questions. A request with neither has no question: the
scores that need one are skipped for it and counted, never scored as a failure.
"""

from __future__ import annotations

# Wikidata relation id -> phrasings of the question, `{}` the subject.
RELATION_QUESTIONS: dict[str, tuple[str, ...]] = {
    "P17": ("Which country is {} located in?", "In which country is {}?",
            "{} is in which country?"),
    "P19": ("Where was {} born?", "What is the birthplace of {}?", "In which place was {} born?"),
    "P20": ("Where did {} die?", "In which city did {} die?", "What is the place of death of {}?"),
    "P27": ("Which country is {} a citizen of?", "What is the nationality of {}?",
            "Of which country does {} hold citizenship?"),
    "P30": ("Which continent is {} located on?", "On which continent is {}?",
            "{} is part of which continent?"),
    "P36": ("What is the capital of {}?", "Which city is the capital of {}?",
            "Name the capital city of {}."),
    "P37": ("What is the official language of {}?", "Which language is official in {}?",
            "What language does the law in {} declare official?"),
    "P39": ("What position does {} hold?", "Which office has {} held?", "What is {}'s position?"),
    "P101": ("What is the field of work of {}?", "In which domain is {} active?",
             "What area does {} work in?"),
    "P103": ("What is the native language of {}?", "Which language did {} speak from birth?",
             "What is {}'s mother tongue?"),
    "P106": ("What is the profession of {}?", "What does {} do for a living?",
             "What is {}'s occupation?"),
    "P108": ("Who is the employer of {}?", "Which company does {} work for?",
             "Who employs {}?"),
    "P127": ("Who owns {}?", "Which company owns {}?", "Who is the owner of {}?"),
    "P131": ("Where is {} located?", "In which region is {}?",
             "Which administrative area is {} in?"),
    "P136": ("What genre of music does {} play?", "What kind of music is {} known for?",
             "Which musical genre is {} associated with?"),
    "P138": ("What is {} named after?", "Who or what was {} named after?",
             "Where does the name of {} come from?"),
    "P140": ("What is the religion of {}?", "Which religion is {} associated with?",
             "What faith does {} follow?"),
    "P159": ("Where is the headquarters of {}?", "In which city is {} headquartered?",
             "Where are {}'s headquarters located?"),
    "P176": ("Which company manufactures {}?", "Who makes {}?", "Who is the manufacturer of {}?"),
    "P178": ("Which company developed {}?", "Who is the developer of {}?", "Who made {}?"),
    "P190": ("What is the twin city of {}?", "Which city is twinned with {}?",
             "Name a sister city of {}."),
    "P264": ("Which record label represents {}?", "What record label is {} signed to?",
             "Which label releases {}'s music?"),
    "P276": ("Where is {} located?", "Where can {} be found?", "In which place is {}?"),
    "P364": ("What is the original language of {}?", "In which language was {} made?",
             "What language is {} in?"),
    "P407": ("In which language was {} written?", "What language is {} written in?",
             "What is the language of {}?"),
    "P413": ("What position does {} play?", "Which position does {} play in?",
             "In which position does {} play?"),
    "P449": ("On which network did {} originally air?", "Which channel first broadcast {}?",
             "Where did {} premiere?"),
    "P463": ("Which organization is {} a member of?", "What is {} affiliated with?",
             "Which group does {} belong to?"),
    "P495": ("Which country did {} originate in?", "What is the country of origin of {}?",
             "Where does {} come from?"),
    "P641": ("What sport does {} play?", "Which sport is {} associated with?",
             "In which sport does {} compete?"),
    "P740": ("Where was {} founded?", "In which city was {} formed?", "Where did {} originate?"),
    "P937": ("In which city did {} work?", "Where did {} work?",
             "What was the place of work of {}?"),
    "P1303": ("Which instrument does {} play?", "What musical instrument is {} known for?",
              "What instrument does {} perform on?"),
    "P1412": ("In which language does {} write?", "What language does {} write in?",
              "Which language did {} use?"),
}


def relation_questions(relation: str, subject: str) -> list[str]:
    """The phrasings of `relation`'s question about `subject` (none for an unknown relation)."""
    return [q.format(subject) for q in RELATION_QUESTIONS.get(relation, ())]


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """`question` as a user turn in the model's chat template, ready for the reply; with a
    template-less tokenizer, the "Question: … Answer:" format of base models."""
    if not has_chat_template(tokenizer):
        context = f"{system}\n" if system else ""
        return f"{context}Question: {question}\nAnswer:"
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id]:
        text = text[len(bos):]  # the prompt is tokenized with special tokens: one <bos>, not two
    return text


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
