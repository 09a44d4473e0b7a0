"""Real-looking English texts whose token counts are exactly what a regime asks for.

Counts are of the sequence the model really runs: BOS, the ColBERT marker or the Embedding
prompt included (a "32-token query" is 32 positions in the decode). A text is grown word by
word from seeded sentences and then topped up with one-token fillers, checking every step
through a ``count`` function supplied by the caller: the encoder's own tokenizer (llama.cpp
side) or the reference tokenizer (PyTorch side). Both sides build the same texts from the
same seed, and the bench checks that they did.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Counter = Callable[[str], int]

_SENTENCES: tuple[str, ...] = (
    "The library opens at nine on weekdays and closes early on public holidays.",
    "Reset your password from the account page, then sign in again on every device.",
    "Our quarterly report shows revenue growth in Europe while costs stayed flat.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
    "Train tickets can be refunded up to one hour before departure without a fee.",
    "The new firmware improves battery life and fixes a bug in the Bluetooth stack.",
    "Patients should fast for eight hours before the blood test in the morning.",
    "The museum's collection covers three centuries of European painting and sculpture.",
    "Solar panels produce less power in winter because the days are shorter.",
    "The contract may be terminated by either party with thirty days of written notice.",
    "Our support team answers most questions within one business day by email.",
    "The river flooded the lower town twice during the last decade of heavy rain.",
    "Students must submit the final project before the end of the spring term.",
    "The hotel offers free breakfast, a small gym and parking for registered guests.",
    "Regular backups protect your files against disk failure and accidental deletion.",
    "The committee approved the budget after a long debate about school funding.",
    "Coffee beans keep their flavour longer when stored in a cool and dark place.",
    "The update changes how search results are ranked for long and rare queries.",
    "Water boils at a lower temperature at high altitude because the air pressure drops.",
    "The city council plans new bike lanes along the main roads next summer.",
    "Each warehouse tracks its stock with barcode scanners and a shared database.",
    "The concert was moved indoors because the forecast warned of strong winds.",
    "Vaccines train the immune system to recognise a virus before an infection.",
    "The court ruled that the company had not informed its customers in time.",
    "Install the package with pip, then run the command line tool with the help flag.",
    "The airline allows one cabin bag and one personal item on every flight.",
    "Old bridges are inspected every two years for cracks, rust and loose bolts.",
    "The novel follows a young engineer who moves to a small town by the sea.",
    "Interest rates rose again this month, and mortgage payments went up as well.",
    "The garden needs water every evening during the hottest weeks of the year.",
    "Employees can work from home on Fridays if their team agrees to the schedule.",
    "The telescope captured clear images of a distant galaxy and its bright core.",
)

_QUESTIONS: tuple[str, ...] = (
    "how do I reset my password and sign in again on my phone and laptop",
    "what time does the city library open on weekdays and public holidays",
    "can I get a refund for a train ticket an hour before the departure",
    "why does water boil at a lower temperature high up in the mountains",
    "which documents do I need to terminate a rental contract with notice",
    "how long should patients fast before a blood test in the morning",
    "what does the new firmware update change for the battery and Bluetooth",
    "where can I park at the hotel and is breakfast included for guests",
    "how should coffee beans be stored so that they keep their flavour",
    "when is the final project due for students in the spring term",
    "what are the rules for cabin bags and personal items on a flight",
    "how often are old bridges inspected for cracks rust and loose bolts",
)

# One-token additions tried in order to hit an exact count; a bare comma or full stop is one
# byte token in every byte-level vocabulary, so the search always ends.
_FILLERS: tuple[str, ...] = (" and", " the", " a", " of", " to", " in", " is", " it", ",", ".")


def _words(source: Sequence[str], rng: random.Random, min_words: int) -> list[str]:
    words: list[str] = []
    while len(words) < min_words:
        words.extend(rng.choice(source).split())
    return words


def fit_text(words: Sequence[str], count: Counter, target: int) -> str:
    """The longest prefix of ``words`` with at most ``target`` tokens, topped up to exactly ``target``.

    Raises ValueError when even one word is too long or no filler reaches the count.
    """
    lo, hi = 0, len(words)  # invariant: prefix of lo words fits (0 words always "fits")
    if count(" ".join(words)) <= target:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ValueError(f"not even one word fits in {target} tokens")
    text = " ".join(words[:lo])
    n = count(text)
    while n < target:
        for filler in _FILLERS:
            m = count(text + filler)
            if m == n + 1:
                text, n = text + filler, m
                break
        else:
            raise ValueError(f"could not reach exactly {target} tokens (stuck at {n})")
    if n != target:
        raise ValueError(f"text has {n} tokens, wanted {target}")
    return text


def make_queries(count: Counter, target: int, n: int, seed: int) -> list[str]:
    """``n`` question-like texts of exactly ``target`` tokens each (as counted by ``count``)."""
    rng = random.Random(f"lfm2edge-bench-queries-{seed}")
    out = []
    for i in range(n):
        first = _QUESTIONS[i % len(_QUESTIONS)].split()
        rest = _words(_QUESTIONS, rng, 4 * target)
        out.append(fit_text(first + rest, count, target))
    return out


def make_documents(count: Counter, target: int, n: int, seed: int) -> list[str]:
    """``n`` prose passages of exactly ``target`` tokens each (as counted by ``count``)."""
    rng = random.Random(f"lfm2edge-bench-documents-{seed}")
    return [fit_text(_words(_SENTENCES, rng, 2 * target), count, target) for _ in range(n)]


@dataclass(frozen=True)
class Texts:
    """The inputs of one model's figures: queries and documents with their exact token counts."""

    queries: tuple[str, ...]
    documents: tuple[str, ...]
    query_tokens: int
    document_tokens: int

    @property
    def digest(self) -> str:
        """A short hash of every text: equal digests mean identical inputs on two sides."""
        h = hashlib.sha256()
        for t in (*self.queries, "\x00", *self.documents):
            h.update(t.encode("utf-8") + b"\x00")
        return h.hexdigest()[:16]


def make_texts(
    query_count: Counter, document_count: Counter, query_tokens: int, document_tokens: int,
    n_queries: int, n_documents: int, seed: int,
) -> Texts:
    return Texts(
        queries=tuple(make_queries(query_count, query_tokens, n_queries, seed)),
        documents=tuple(make_documents(document_count, document_tokens, n_documents, seed)),
        query_tokens=query_tokens,
        document_tokens=document_tokens,
    )
