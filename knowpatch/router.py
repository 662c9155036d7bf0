"""The router: which patches a query concerns.

Each patch carries keys computed when it is made, from its own edit requests only (never
from a benchmark's paraphrase or neighbourhood prompts): for every request, the base
model's hidden states at an early decoder layer (default: the output of layer 1) at each
token of the request's *subject*, read in the edit prompt. A query fires a patch when
every subject token finds a close match somewhere in the query:

    score(query, patch) = max over key variants  min over subject tokens
                          max over query positions  cos(h_query[pos], key[token])

and `score >= threshold`. Why this signal (measured on SmolLM2, 60 CounterFact records,
see docs/routing.md): a key read at the prompt's *last* token cannot tell a
paraphrase from a neighbour (same template, other subject; AUC ≈ 0.2), while the subject's
tokens at layer 1 do (AUC 0.999 paraphrase vs neighbour); taking the minimum over all
subject tokens keeps "The language of Keoma" from firing the patch of "Mandailing
language", which a last-subject-token key fires at cos 0.96.

The keys are hidden states of the unedited model, so routing runs the base model's first
`layer` blocks only (a few percent of a forward pass) with every adapter off. A `<bos>`
token is put before every text (keys and queries alike) so that the first real token is
not the attention sink, whose hidden state looks alike for every text.

Written by hand: PEFT selects adapters per batch row (`adapter_names`) but one adapter per
row, and has no notion of matching a query against stored keys.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from .models import decoder_layers
from .scope import Turn, is_scope, scope_kind, score_entries

ROW_CHUNK = 64
"""Query rows scored in one product (bounds its memory: rows × positions × keys)."""
SCORES_KEPT = 16
"""A route keeps the scores of the patches it fires and of its best SCORES_KEPT others (every
score of every row is rows × store floats: at 10,000 patches, 20,000 routed prompts held
200 M of them, over 8 GB)."""


class _Stop(Exception):
    """Raised by a layer hook to end a forward pass once the needed layer has run."""


@torch.no_grad()
def hidden_rows(model, rows: list[list[int]], layer: int, bos: int | None,
                batch_size: int = 64) -> list[torch.Tensor]:
    """The output of decoder block `layer - 1` (i.e. `hidden_states[layer]`) for each row of
    token ids (no padding), as float32 tensors of shape (tokens, hidden): only the first
    `layer` blocks run. `bos` (if not None) is put before each row that does not start with
    it, and is left out of the result.
    """
    _, blocks = decoder_layers(model)
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"router layer must be in 1..{len(blocks)}, got {layer}")
    device = next(model.parameters()).device
    prefix = [] if bos is None else [bos]
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = blocks[layer - 1].register_forward_hook(grab)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = [list(rows[i]) if list(rows[i][:1]) == prefix else prefix + list(rows[i])
                    for i in chunk]
            width = max(map(len, seqs))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, s in enumerate(seqs):  # left padding, positions counted from the first token
                ids[r, width - len(s):] = torch.tensor(s)
                mask[r, width - len(s):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device),
                      position_ids=pos.to(device), use_cache=False)
            except _Stop:
                pass
            h = captured.pop("h").float().cpu()
            for r, (i, s) in enumerate(zip(chunk, seqs)):
                n = len(s) - len(prefix)  # the result leaves the <bos> out
                out[i] = h[r, width - n:] if n else h[r, :0]
    finally:
        handle.remove()
    return out  # type: ignore[return-value]


def subject_token_span(tokenizer, text: str, subject: str, add_special_tokens: bool = False
                       ) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the indices of the tokens that overlap `subject` (last
    occurrence, case-sensitive; empty when the subject is not in the text). A token that
    runs on past the subject into other text (")?" in "… made USS Leedstown (APA-56)?",
    where a question spells ")") is left out when the subject has other tokens: a key read
    there would match only queries that go on the same way; so are punctuation tokens at
    the subject's ends (its ")", which another query may spell ")?")."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    start = text.rfind(subject)
    if start < 0 or not subject:
        return enc["input_ids"], []
    end = start + len(subject)
    offsets = enc["offset_mapping"]
    span = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    inside = [i for i in span if not (text[offsets[i][0]:start].strip()
                                      or text[end:offsets[i][1]].strip())] or span
    words = [i for i in inside if any(c.isalnum() for c in text[offsets[i][0]:offsets[i][1]])]
    return enc["input_ids"], [i for i in inside if words[0] <= i <= words[-1]] if words else inside


def key_texts(prompt: str, subject: str) -> list[str]:
    """The texts a request's keys are read from: the edit prompt itself and, when the
    prompt opens with the subject, the same prompt read mid-sentence (the subject's first
    token is then another token, " Angola" rather than "Angola")."""
    texts = [prompt]
    if prompt.startswith(subject):
        texts.append("Then " + prompt)
    return texts


@torch.no_grad()
def compute_keys(model, tokenizer, requests, layer: int) -> dict[str, torch.Tensor] | None:
    """Keys of a patch from its requests: {"keys": (n, hidden) unit vectors, "variant": (n,)
    the key variant each row belongs to, "tokens": (n,) the token id each key was read at
    (for the token index)}. None when a request has no subject in its prompt
    (such a patch cannot be routed and is active for every query)."""
    texts, spans = [], []
    for req in requests:
        if not req.subject or req.subject not in req.prompt:
            return None
        for text in key_texts(req.prompt, req.subject):
            ids, span = subject_token_span(tokenizer, text, req.subject)
            if not span:
                return None
            texts.append(ids)
            spans.append(span)
    hidden = hidden_rows(model, texts, layer, tokenizer.bos_token_id)
    keys, variant, tokens = [], [], []
    for v, (h, span, ids) in enumerate(zip(hidden, spans, texts)):
        keys.append(torch.nn.functional.normalize(h[span], dim=-1))
        variant += [v] * len(span)
        tokens += [ids[i] for i in span]
    return {"keys": torch.cat(keys).contiguous(), "variant": torch.tensor(variant, dtype=torch.long),
            "tokens": torch.tensor(tokens, dtype=torch.long)}


def _token_texts(tokenizer) -> dict[int, str]:
    """{token id: its text}, read once per tokenizer (0.4 s for SmolLM2's vocabulary) for
    `canonical_tokens` and `word_edges`."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _TEXTS:
        _TEXTS[key] = {i: tokenizer.convert_tokens_to_string([token])
                       for token, i in tokenizer.get_vocab().items()}
    return _TEXTS[key]


_TEXTS: dict[tuple[str, int], dict[int, str]] = {}


def canonical_tokens(tokenizer) -> dict[int, int]:
    """{token id: id of its canonical form} for the tokens whose text, without a leading
    space marker and in lower case, is another token's: both map to the smallest such id."""
    groups: dict[str, list[int]] = {}
    for i, text in _token_texts(tokenizer).items():
        if text.strip():
            groups.setdefault(text.strip().lower(), []).append(i)
    return {i: min(ids) for ids in groups.values() if len(ids) > 1 for i in ids}


def word_edges(tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """(tokens whose text opens with a letter or digit — no space before it —, tokens whose
    text ends with one): where the first kind follows the second, the two spell one word."""
    texts = _token_texts(tokenizer).items()
    return (frozenset(i for i, t in texts if t[:1].isalnum()),
            frozenset(i for i, t in texts if t[-1:].isalnum()))


@dataclass
class Entry:
    patch_id: str
    keys: torch.Tensor  # (n, hidden), unit rows
    variant: torch.Tensor  # (n,)
    layer: int
    threshold: float
    facts: frozenset[str] = frozenset()
    order: int = 0
    spellings: tuple[tuple[int, ...], ...] | None = None
    """Per key variant, the canonical token ids of its subject in order (None: keys without
    token ids, from patches made before the index: always a candidate)."""
    filed: frozenset[int] = frozenset()
    """The tokens the index files this patch under (one per variant)."""
    scope: str = ""
    """A scoped patch (`scope`; always a candidate, scored apart from the subject keys):
    "examples" (keys are pooled example prompts, scored by nearest neighbours) or "chat"
    (fires on every chat prompt); "" for a subject patch."""


@dataclass
class Route:
    """The routing decision for one query: the patches it fires, with their scores and the
    best `SCORES_KEPT` others'."""

    fired: list[str]
    scores: dict[str, float]
    superseded: dict[str, str] = field(default_factory=dict)  # fired but dropped: old -> new
    positions: dict[str, list[int]] = field(default_factory=dict)
    """For each fired patch: the query positions (in the row, without <bos>) where its
    subject tokens matched best (the best-scoring key variant)."""


def fact_of(req) -> str:
    """What a request rewrites, for telling when a newer patch supersedes an older one."""
    return " ".join(req.prompt.lower().split())


class Router:
    """Keys of many patches; routes token-id rows to the patches they concern."""

    def __init__(self, index: bool = True, canonical: dict[int, int] | None = None,
                 edges: tuple[frozenset[int], frozenset[int]] | None = None,
                 turn: Turn | None = None) -> None:
        self.entries: dict[str, Entry] = {}
        self._counter = 0
        self._cache: dict[int, tuple] = {}
        self.index = index
        """Score a query only against patches whose subject (the tokens of some key variant)
        it spells as a whole word sequence; False: against every patch (exhaustive)."""
        self._postings: dict[int, set[str]] = {}  # token id -> patches with a variant filed under it
        self._unindexed: set[str] = set()  # patches without token ids: always candidates
        self.canonical = canonical or {}
        """token id -> the id of the same word without its leading space and in lower case
        (see `canonical_tokens`): " Eiffel" at mid-sentence and "Eiffel" opening a query
        count as the same token for the index."""
        self.opens, self.ends = edges or (frozenset(), frozenset())
        """See `word_edges`: a subject spelled inside a longer word ("Re" of "Reuchlin",
        "5" of "952") is no match for the index."""
        self.turn = turn
        """Where a chat prompt's user message lies (`scope.chat_turn`), for scoped patches."""

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, patch_id: str) -> bool:
        return patch_id in self.entries

    def add(self, patch_id: str, keys: dict[str, torch.Tensor], layer: int, threshold: float,
            facts: frozenset[str] = frozenset()) -> None:
        self._counter += 1
        self.remove(patch_id)
        spellings = None
        if "tokens" in keys and not is_scope(keys):
            variant, tokens = keys["variant"].tolist(), keys["tokens"].tolist()
            same = self.canonical.get
            spellings = tuple(tuple(same(t, t) for t, v in zip(tokens, variant) if v == k)
                              for k in sorted(set(variant)))
        filed = frozenset(self._filing_tokens(spellings or ()))
        self.entries[patch_id] = Entry(patch_id, keys["keys"].float(), keys["variant"].long(),
                                       int(layer), float(threshold), frozenset(facts),
                                       self._counter, spellings, filed, scope_kind(keys))
        for token in filed:
            self._postings.setdefault(token, set()).add(patch_id)
        if spellings is None:
            self._unindexed.add(patch_id)
        self._cache.clear()

    def _filing_tokens(self, spellings) -> set[int]:
        """One token per key variant (the one with the fewest patches filed under it when
        the patch is added): a query that holds all of a variant's tokens holds that one."""
        return {min(sorted(set(v)), key=lambda t: len(self._postings.get(t, ())))
                for v in spellings if v}

    def remove(self, patch_id: str) -> None:
        entry = self.entries.pop(patch_id, None)
        if entry is not None:
            for token in entry.filed:
                self._postings[token].discard(patch_id)
            self._unindexed.discard(patch_id)
            self._cache.clear()

    def candidates(self, row: list[int], among: Collection[str] | None = None) -> set[str]:
        """The patches a query of token ids `row` may fire under the index: those with a key
        variant whose subject tokens the row holds in order, one after the other, not inside a
        longer word (and patches without token ids). Without this, "Re!" (keyed at "Re")
        fired on "Reuchlin" and "Revenge", "Bundesautobahn 5" on "Bundesautobahn 952", "The
        Motors" on "Then, the British team … Pak Suzuki Motors"."""
        canon = [self.canonical.get(t, t) for t in row]
        present = set(canon)
        out = set(self._unindexed)
        for token in present:
            for p in self._postings.get(token, ()):
                if p not in out and any(set(v) <= present and self._spells(row, canon, v)
                                        for v in self.entries[p].spellings):
                    out.add(p)
        return out if among is None else out & set(among)

    def _spells(self, row: list[int], canon: list[int], subject: tuple[int, ...]) -> bool:
        """Whether `row` (canonical: `canon`) holds `subject` as consecutive tokens that
        neither continue the word before them nor run on into the word after them."""
        n = len(subject)
        for i in range(len(row) - n + 1):
            if tuple(canon[i:i + n]) != subject:
                continue
            j = i + n
            glued_before = i > 0 and row[i - 1] in self.ends and row[i] in self.opens
            glued_after = j < len(row) and row[j - 1] in self.ends and row[j] in self.opens
            if not (glued_before or glued_after):
                return True
        return False

    def superseded(self) -> dict[str, str]:
        """Patches every fact of which a newer patch rewrites: {old id: newest such id}."""
        out: dict[str, str] = {}
        entries = sorted(self.entries.values(), key=lambda e: e.order)
        for i, old in enumerate(entries):
            if not old.facts:
                continue
            newer = [e for e in entries[i + 1:] if e.facts & old.facts]
            covered = frozenset().union(*(e.facts for e in newer)) if newer else frozenset()
            if newer and old.facts <= covered:
                out[old.patch_id] = newer[-1].patch_id
        return out

    def _tables(self, layer: int, candidates: tuple[str, ...]):
        """Concatenated keys of the candidates routed at `layer` (cached until keys change)."""
        key = hash((layer, candidates))
        if key not in self._cache:
            entries = [self.entries[c] for c in candidates if c in self.entries
                       and self.entries[c].layer == layer and not self.entries[c].scope]
            if not entries:
                self._cache[key] = None
            else:
                keys = torch.cat([e.keys for e in entries])
                patch_of = torch.cat([torch.full((len(e.keys),), i, dtype=torch.long)
                                      for i, e in enumerate(entries)])
                # a global variant index per (patch, variant)
                variant, base = [], 0
                for e in entries:
                    variant.append(e.variant + base)
                    base += int(e.variant.max()) + 1 if len(e.variant) else 0
                variant = torch.cat(variant)
                variant_patch = torch.zeros(base, dtype=torch.long)
                variant_patch[variant] = patch_of
                thresholds = torch.tensor([e.threshold for e in entries])
                self._cache[key] = (entries, keys, variant, variant_patch, thresholds)
            if len(self._cache) > 8:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def score(self, hidden: dict[int, torch.Tensor], candidates: list[str] | None = None
              ) -> dict[str, float]:
        """Score of every candidate patch for one query, from its hidden states per layer."""
        return self.score_rows([hidden], candidates, keep=None)[0][0]

    def score_rows(self, hidden: list[dict[int, torch.Tensor]], candidates: list[str] | None = None,
                   keep: int | None = SCORES_KEPT) -> list[tuple[dict[str, float], list[str]]]:
        """`score` for many queries at once, and the patches each fires: one padded
        product per layer against every key (written by hand, vectorised over rows: the
        store-sized part of a routed query). Each row keeps the scores of the patches it
        fires and of its best `keep` others (None: every score)."""
        candidates = tuple(self.entries if candidates is None else candidates)
        out: list[tuple[dict[str, float], list[str]]] = [({}, []) for _ in hidden]
        layers = sorted({layer for h in hidden for layer in h})
        for layer in layers:
            tables = self._tables(layer, candidates)
            if tables is None:
                continue
            present = [r for r, h in enumerate(hidden) if layer in h and h[layer].shape[0] > 0]
            for start in range(0, len(present), ROW_CHUNK):
                self._score_chunk(hidden, present[start:start + ROW_CHUNK], layer, tables, out, keep)
        return out

    @staticmethod
    def _score_chunk(hidden, rows: list[int], layer: int, tables, out, keep: int | None) -> None:
        """score_rows for `rows` (all with tokens at `layer`), into `out`."""
        entries, keys, variant, variant_patch, thresholds = tables
        width = max(hidden[r][layer].shape[0] for r in rows)
        padded = torch.zeros((len(rows), width, keys.shape[1]))
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            h = hidden[r][layer]
            padded[i, :h.shape[0]] = torch.nn.functional.normalize(h.float(), dim=-1)
            valid[i, :h.shape[0]] = True
        sims = (padded @ keys.T).masked_fill_(~valid[:, :, None], -float("inf"))
        per_token = sims.max(1).values  # (rows, key tokens): best query position
        per_variant = torch.full((len(rows), len(variant_patch)), float("inf")).scatter_reduce(
            1, variant.expand(len(rows), -1), per_token, "amin")
        per_patch = torch.full((len(rows), len(entries)), -float("inf")).scatter_reduce(
            1, variant_patch.expand(len(rows), -1), per_variant, "amax")
        fires = per_patch >= thresholds
        best = None if keep is None else per_patch.topk(min(keep, len(entries)), dim=1).indices
        ids = [e.patch_id for e in entries]
        for i, r in enumerate(rows):
            scores, fired = out[r]
            now = fires[i].nonzero().flatten().tolist()
            kept = list(range(len(ids))) if best is None else best[i].tolist() + now
            scores.update(zip([ids[j] for j in kept], per_patch[i, kept].tolist()))
            fired += [ids[j] for j in now]

    def decide(self, scores: dict[str, float], fired: list[str] | None = None) -> Route:
        """The route from the candidates' scores (`fired`: those at or above their
        threshold, when already known)."""
        if fired is None:
            fired = [p for p, s in scores.items() if s >= self.entries[p].threshold]
        fired = list(fired)
        fired.sort(key=lambda p: self.entries[p].order)
        dropped: dict[str, str] = {}
        for i, old in enumerate(fired):  # the newest patch rewriting a fact wins
            for new in fired[i + 1:]:
                if self.entries[old].facts & self.entries[new].facts:
                    dropped[old] = new
        return Route([p for p in fired if p not in dropped], scores, dropped)

    def layers(self, candidates: list[str] | None = None) -> list[int]:
        names = self.entries if candidates is None else [c for c in candidates if c in self.entries]
        return sorted({self.entries[c].layer for c in names})

    def route_rows(self, model, rows: list[list[int]], bos: int | None,
                   candidates: list[str] | None = None,
                   locate: Collection[str] = ()) -> list[Route]:
        """Route each row of token ids (no padding); `model` must be the base model. For
        fired patches in `locate`, also where in the row their subject is (`positions`)."""
        allowed = None
        if self.index:
            among = self.entries if candidates is None else candidates
            allowed = [self.candidates(row, among) for row in rows]
            candidates = sorted(set().union(*allowed), key=lambda p: self.entries[p].order)
        hidden: list[dict[int, torch.Tensor]] = [{} for _ in rows]
        for layer in self.layers(candidates):
            for r, h in enumerate(hidden_rows(model, rows, layer, bos)):
                hidden[r][layer] = h
        scored = self.score_rows(hidden, candidates)
        scoped = [self.entries[p] for p in candidates or self.entries if self.entries[p].scope]
        if scoped:
            score_entries(scoped, hidden, rows, self.turn, scored)
        if allowed is not None:  # a patch scored for the batch fires only where it may
            scored = [(scores, [p for p in fired if p in ok]) for (scores, fired), ok in zip(scored, allowed)]
        routes = [self.decide(scores, fired) for scores, fired in scored]
        for route, h in zip(routes, hidden):
            for p in route.fired:
                if p in locate:
                    route.positions[p] = self.positions(h, p)
        return routes

    def positions(self, hidden: dict[int, torch.Tensor], patch_id: str) -> list[int]:
        """Where in a query (its hidden states per layer) patch `patch_id`'s subject is:
        for its best key variant, the best-matching position of each key token."""
        e = self.entries[patch_id]
        h = torch.nn.functional.normalize(hidden[e.layer].float(), dim=-1)
        if h.shape[0] == 0 or e.scope:  # a scope names no subject
            return []
        sims = e.keys @ h.T  # (key tokens, query positions)
        best = sims.max(1)
        worst = torch.full((int(e.variant.max()) + 1,), float("inf")).scatter_reduce(
            0, e.variant, best.values, "amin")
        chosen = int(worst.argmax())
        return sorted(set(best.indices[e.variant == chosen].tolist()))


def merge_keys(old: dict[str, torch.Tensor] | None,
               new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of `old` and `new` as one set (their variants kept apart)."""
    if old is None:
        return new
    offset = int(old["variant"].max()) + 1 if len(old["variant"]) else 0
    merged = {"keys": torch.cat([old["keys"], new["keys"]]),
              "variant": torch.cat([old["variant"], new["variant"] + offset])}
    if "tokens" in old and "tokens" in new:
        merged["tokens"] = torch.cat([old["tokens"], new["tokens"]])
    return merged
