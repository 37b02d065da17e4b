"""The text tasks of the demo assets (app/demo_assets): what the base model and each adapter were
trained to do, as plain functions, so that the build script, its test and anyone reading a demo
output can compute the expected answer instead of trusting a stored one.

A text is 2-4 distinct items, each a word of `WORDS` or a number of 1-2 digits, joined by single
spaces. The model sees `PROMPT_FORMAT.format(text=text)` and answers with the task's output, then
EOS. Texts are split once and for all into training and held-out ones by a hash of the text, so the
held-out prompts of the test and of demo.json were never trained on, whatever was sampled.
"""

from __future__ import annotations

import random
import re
import string
import zlib
from collections.abc import Callable

PROMPT_FORMAT = "{text} => "

# Short words covering all 26 letters, so that the upper-casing and cipher adapters see every letter.
WORDS = [
    "a",
    "an",
    "and",
    "big",
    "blue",
    "box",
    "cat",
    "cold",
    "day",
    "dog",
    "egg",
    "fox",
    "fun",
    "go",
    "hat",
    "hot",
    "ice",
    "jam",
    "jazz",
    "key",
    "kid",
    "log",
    "map",
    "mix",
    "new",
    "owl",
    "pen",
    "pig",
    "quiz",
    "red",
    "run",
    "sky",
    "sun",
    "top",
    "up",
    "van",
    "vex",
    "wet",
    "wax",
    "yak",
    "yes",
    "zoo",
    "zip",
]
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_ITEMS, MAX_ITEMS = 2, 4
NUMBER_RATE = 0.5  # chance that an item is a number rather than a word

# A fixed substitution key: plain a..z -> the letters of a QWERTY keyboard, row by row.
CIPHER_KEY = "qwertyuiopasdfghjklzxcvbnm"
_CIPHER = str.maketrans(string.ascii_lowercase + string.ascii_uppercase, CIPHER_KEY + CIPHER_KEY.upper())

HELD_OUT_PERCENT = 10  # share of all possible texts reserved for evaluation


def copy_text(text: str) -> str:
    """The base model's task: repeat the text."""
    return text


def upper(text: str) -> str:
    return text.upper()


def reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


def spell_digits(text: str) -> str:
    """Every digit as its English word, the digits of a number separated by spaces: 42 -> four two."""
    return re.sub(r"\d+", lambda m: " ".join(DIGIT_WORDS[int(d)] for d in m.group()), text)


def cipher(text: str) -> str:
    """Substitute each letter by CIPHER_KEY (case kept); other characters are unchanged."""
    return text.translate(_CIPHER)


BASE_TASK = ("repeats the text", copy_text)
# adapter name -> (one-line description, text -> expected output)
ADAPTER_TASKS: dict[str, tuple[str, Callable[[str], str]]] = {
    "upper": ("upper-cases the text", upper),
    "reverse": ("reverses the order of the words", reverse_words),
    "digits": ("spells every digit as a word (42 -> four two)", spell_digits),
    "cipher": (f"substitution cipher of the letters, a..z -> {CIPHER_KEY}", cipher),
}


def prompt(text: str) -> str:
    return PROMPT_FORMAT.format(text=text)


def is_held_out(text: str) -> bool:
    """Whether `text` belongs to the held-out split: a stable hash, not the sampling order, decides,
    so no training sample can ever be a held-out prompt."""
    return zlib.crc32(text.encode()) % 100 < HELD_OUT_PERCENT


def sample_text(rng: random.Random) -> str:
    """One text of either split: 2-4 distinct items, at least one of them a word."""
    while True:
        items = [
            str(rng.randrange(10 ** rng.randint(1, 2))) if rng.random() < NUMBER_RATE else rng.choice(WORDS)
            for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS))
        ]
        if len(set(items)) == len(items) and any(item.isalpha() for item in items):
            return " ".join(items)


def training_texts(rng: random.Random, n: int) -> list[str]:
    """`n` training texts (never held-out ones)."""
    texts: list[str] = []
    while len(texts) < n:
        text = sample_text(rng)
        if not is_held_out(text):
            texts.append(text)
    return texts


def held_out_texts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct held-out texts that every adapter visibly changes (each holds a word and a
    number), the same for a given seed: the prompts of the test and of demo.json's examples."""
    rng, texts = random.Random(seed), dict[str, None]()
    while len(texts) < n:
        text = sample_text(rng)
        if is_held_out(text) and all(fn(text) != text for _, fn in ADAPTER_TASKS.values()):
            texts[text] = None
    return list(texts)
