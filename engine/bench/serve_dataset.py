"""The synthetic shared-prefix conversations of `tierkv bench serve`.

Conversations fall into `num_prefixes` groups; every conversation of a group opens with the same
system prefix of `prefix_len` words, then each turn adds a unique user text of `input_len` words.
Turn k's prompt is turn k-1's prompt + its answer + the new user text, so a server with prefix
caching recomputes only the new tail: the shared-prefix and multi-turn reuse of real chat traffic.

Words are drawn from a fixed vocabulary with a seeded generator, so the texts are the same for
the same seed on every machine. When the server can count tokens (`/tokenize`), the vocabulary is
first cut to the words that are exactly one token each (alone and after a space), which makes the
lengths exact token counts; otherwise a length is a word count and the server's usage tells the
real prompt tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Short common English words: one token each in most BPE and SentencePiece vocabularies.
WORDS: tuple[str, ...] = tuple("""
the of and to in is was for on are with as at be by this had not but from or have an they which one
you were her all she there would their we him been has when who will more no if out so said what up
its about into than them can only other new some could time these two may then do first any my now
such like our over man me even most made after also did many before must through back years where
much your way well down should because each just those people how too little state good very make
world still own see men work long get here between both life being under never day same another know
while last might us great old year off come since against go came right used take three small home
large house water room form hand light book line end high place set part point run city sun air side
word page game ball tree road fire song bird fish river stone green blue red black white gold
""".split())


@dataclass(frozen=True)
class DatasetConfig:
    """The shape of the dataset; every length is in words (tokens when the vocabulary is exact)."""

    num_conversations: int
    num_prefixes: int
    prefix_len: int
    input_len: int
    turns: int
    seed: int


@dataclass(frozen=True)
class Conversation:
    """One conversation: its group's shared system prefix and one new user text per turn."""

    index: int
    group: int
    system_prefix: str
    user_texts: tuple[str, ...]

    @property
    def first_in_group(self) -> bool:
        """The group's first conversation: its first turn is the one that finds the prefix cold."""
        return self.index == self.group

    def completion_prompt(self, turn: int, answers: Sequence[str]) -> str:
        """The prompt text of `turn` (0-based): prefix, then every earlier user text and answer."""
        parts = [self.system_prefix] if self.system_prefix else []
        for k in range(turn):
            parts.append(self.user_texts[k] + answers[k])
        parts.append(self.user_texts[turn])
        return " ".join(parts)

    def chat_messages(self, turn: int, answers: Sequence[str]) -> list[dict[str, str]]:
        """The messages of `turn`: the system prefix, then user/assistant pairs, the new user text last."""
        messages = [{"role": "system", "content": self.system_prefix}] if self.system_prefix else []
        for k in range(turn):
            messages.append({"role": "user", "content": self.user_texts[k]})
            messages.append({"role": "assistant", "content": answers[k]})
        messages.append({"role": "user", "content": self.user_texts[turn]})
        return messages


def word_probe(word: str) -> str:
    """The text whose token count tells whether `word` is one token both alone and after a space."""
    return f"{word} {word}"


def single_token_words(words: Sequence[str], count_tokens: Callable[[str], int]) -> list[str]:
    """The words that are one token both alone and after a space (their probe is exactly 2 tokens)."""
    return [w for w in words if count_tokens(word_probe(w)) == 2]


def build_conversations(config: DatasetConfig, vocabulary: Sequence[str] = WORDS) -> list[Conversation]:
    """Conversation i belongs to group i % num_prefixes; texts depend only on the seed and vocabulary."""
    if not vocabulary:
        raise ValueError("the vocabulary is empty")
    prefixes = [_words(random.Random(f"{config.seed}/prefix/{g}"), vocabulary, config.prefix_len)
                for g in range(config.num_prefixes)]
    conversations = []
    for i in range(config.num_conversations):
        rng = random.Random(f"{config.seed}/conversation/{i}")
        users = tuple(_words(rng, vocabulary, config.input_len) for _ in range(config.turns))
        group = i % config.num_prefixes
        conversations.append(Conversation(i, group, prefixes[group], users))
    return conversations


def _words(rng: random.Random, vocabulary: Sequence[str], n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))
