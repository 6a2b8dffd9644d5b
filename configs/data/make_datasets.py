"""Generate the small synthetic datasets shipped in ``configs/data``.

Everything is built from templates and hard-coded word lists written by the
Flotilla authors; nothing is downloaded. A fixed seed makes the output
byte-identical on every run::

    python configs/data/make_datasets.py            # writes next to this file
    python configs/data/make_datasets.py --out DIR  # writes somewhere else

All outputs are released under CC0.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SEED = 20240611

Item = tuple[str, str]  # (prompt, response)
Row = dict[str, Any]

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def fmt(answer: str, reason: str) -> str:
    """Return a response in the house style ``Answer: <x>. Reason: <y>.``."""
    return f"Answer: {answer}. Reason: {reason}."


def cap(text: str) -> str:
    """Upper-case the first character of ``text``."""
    return text[:1].upper() + text[1:]


def sub_rng(name: str) -> random.Random:
    """Return an RNG seeded from ``SEED`` and ``name`` (stable across runs)."""
    return random.Random(f"{SEED}:{name}")


def write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    """Write ``rows`` as UTF-8 JSON Lines with Unix line endings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_lines(path: Path, lines: Sequence[str]) -> None:
    """Write pre-serialised lines verbatim (used for the deliberately bad files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line + "\n")


# ---------------------------------------------------------------------------
# Instruction task families (all answers in the "Answer: .. Reason: .." style)
# ---------------------------------------------------------------------------

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"),
    ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Greece", "Athens"),
    ("Sweden", "Stockholm"),
    ("Norway", "Oslo"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Iceland", "Reykjavik"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"),
    ("Lithuania", "Vilnius"),
    ("Latvia", "Riga"),
    ("Estonia", "Tallinn"),
    ("Ukraine", "Kyiv"),
    ("Russia", "Moscow"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Senegal", "Dakar"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("South Korea", "Seoul"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Jordan", "Amman"),
    ("Nepal", "Kathmandu"),
    ("Mongolia", "Ulaanbaatar"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"),
]

ANTONYMS: list[tuple[str, str]] = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("high", "low"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("young", "old"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("thick", "thin"),
    ("long", "short"),
    ("heavy", "light"),
    ("win", "lose"),
    ("buy", "sell"),
    ("push", "pull"),
    ("begin", "end"),
    ("above", "below"),
    ("inside", "outside"),
    ("true", "false"),
    ("cheap", "expensive"),
    ("deep", "shallow"),
    ("friend", "enemy"),
    ("give", "take"),
    ("increase", "decrease"),
    ("remember", "forget"),
    ("accept", "reject"),
    ("arrive", "depart"),
    ("ancient", "modern"),
    ("wide", "narrow"),
    ("sharp", "dull"),
    ("smooth", "rough"),
    ("safe", "dangerous"),
    ("tight", "loose"),
    ("awake", "asleep"),
    ("present", "absent"),
    ("maximum", "minimum"),
    ("north", "south"),
    ("east", "west"),
    ("day", "night"),
    ("love", "hate"),
    ("question", "answer"),
    ("always", "never"),
    ("everything", "nothing"),
    ("before", "after"),
    ("up", "down"),
    ("top", "bottom"),
    ("polite", "rude"),
    ("generous", "selfish"),
    ("success", "failure"),
    ("borrow", "lend"),
    ("import", "export"),
    ("float", "sink"),
    ("laugh", "cry"),
    ("victory", "defeat"),
]

# (singular, plural, rule) -- the rule selects the explanation.
PLURALS: list[tuple[str, str, str]] = [
    ("mouse", "mice", "irregular"),
    ("child", "children", "irregular"),
    ("man", "men", "irregular"),
    ("woman", "women", "irregular"),
    ("tooth", "teeth", "irregular"),
    ("foot", "feet", "irregular"),
    ("goose", "geese", "irregular"),
    ("person", "people", "irregular"),
    ("ox", "oxen", "irregular"),
    ("sheep", "sheep", "same"),
    ("deer", "deer", "same"),
    ("aircraft", "aircraft", "same"),
    ("series", "series", "same"),
    ("cactus", "cacti", "latin"),
    ("fungus", "fungi", "latin"),
    ("nucleus", "nuclei", "latin"),
    ("analysis", "analyses", "is"),
    ("crisis", "crises", "is"),
    ("thesis", "theses", "is"),
    ("phenomenon", "phenomena", "on"),
    ("criterion", "criteria", "on"),
    ("leaf", "leaves", "f"),
    ("knife", "knives", "f"),
    ("wife", "wives", "f"),
    ("wolf", "wolves", "f"),
    ("half", "halves", "f"),
    ("shelf", "shelves", "f"),
    ("loaf", "loaves", "f"),
    ("box", "boxes", "es"),
    ("bus", "buses", "es"),
    ("church", "churches", "es"),
    ("dish", "dishes", "es"),
    ("fox", "foxes", "es"),
    ("glass", "glasses", "es"),
    ("watch", "watches", "es"),
    ("potato", "potatoes", "es"),
    ("tomato", "tomatoes", "es"),
    ("hero", "heroes", "es"),
    ("city", "cities", "y"),
    ("baby", "babies", "y"),
    ("story", "stories", "y"),
    ("party", "parties", "y"),
    ("berry", "berries", "y"),
    ("lady", "ladies", "y"),
    ("country", "countries", "y"),
    ("day", "days", "vy"),
    ("boy", "boys", "vy"),
    ("key", "keys", "vy"),
    ("toy", "toys", "vy"),
    ("cat", "cats", "s"),
    ("book", "books", "s"),
    ("chair", "chairs", "s"),
    ("tree", "trees", "s"),
    ("river", "rivers", "s"),
    ("apple", "apples", "s"),
    ("pencil", "pencils", "s"),
    ("garden", "gardens", "s"),
    ("window", "windows", "s"),
    ("bridge", "bridges", "s"),
    ("cloud", "clouds", "s"),
]

PLURAL_REASONS = {
    "irregular": "'{s}' has an irregular plural",
    "same": "'{s}' stays the same in the plural",
    "latin": "'{s}' keeps its Latin plural ending -i",
    "is": "nouns ending in -is change to -es",
    "on": "'{s}' keeps its Greek plural ending -a",
    "f": "the final f or fe changes to -ves",
    "es": "nouns ending in s, x, ch, sh or o add -es",
    "y": "a consonant before y means y changes to -ies",
    "vy": "a vowel before y means you just add -s",
    "s": "most nouns simply add -s",
}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

# Unit (singular), unit (plural), target unit (plural), factor.
CONVERSIONS: list[tuple[str, str, str, int]] = [
    ("kilometer", "kilometers", "meters", 1000),
    ("meter", "meters", "centimeters", 100),
    ("centimeter", "centimeters", "millimeters", 10),
    ("kilogram", "kilograms", "grams", 1000),
    ("liter", "liters", "milliliters", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("foot", "feet", "inches", 12),
    ("yard", "yards", "feet", 3),
    ("year", "years", "months", 12),
]

# fmt: off
WORDS: list[str] = [
    "apple", "banana", "cherry", "garden", "window", "pencil", "rabbit",
    "mirror", "letter", "summer", "winter", "yellow", "orange", "planet",
    "rocket", "bottle", "kitten", "puzzle", "coffee", "butter", "balloon",
    "teacher", "library", "mountain", "elephant", "notebook", "umbrella",
    "sunflower", "chocolate", "strawberry", "river", "tiger", "lemon", "table",
    "cloud", "bread", "ocean", "silver", "candle", "basket", "dolphin",
    "pepper", "jungle", "violin", "hammer", "zebra", "igloo", "quilt", "kettle",
    "falcon", "needle", "walnut", "xylophone", "yogurt", "meadow", "harbor",
    "engine", "tunnel", "parrot", "ladder",
]
# fmt: on


def gen_arithmetic(rng: random.Random) -> Item:
    """Make an addition, subtraction or multiplication item with small numbers."""
    op = rng.choice(["add", "sub", "mul"])
    if op == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        prompt = rng.choice(["What is {a} + {b}?", "Calculate {a} plus {b}.", "Add {a} and {b}."]).format(
            a=a, b=b
        )
        return prompt, fmt(str(a + b), f"{a} + {b} = {a + b}")
    if op == "sub":
        a = rng.randint(6, 50)
        b = rng.randint(1, a - 1)
        prompt = rng.choice(
            ["What is {a} - {b}?", "Subtract {b} from {a}.", "Calculate {a} minus {b}."]
        ).format(a=a, b=b)
        return prompt, fmt(str(a - b), f"{a} - {b} = {a - b}")
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} x {b}?"]).format(
        a=a, b=b
    )
    return prompt, fmt(str(a * b), f"{a} times {b} is {a * b}")


def gen_conversion(rng: random.Random) -> Item:
    """Make a unit conversion item with an integer factor."""
    src1, src_n, dst_n, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 12)
    total = n * factor
    prompt = rng.choice(
        [
            "Convert {n} {src} to {dst_n}.",
            "How many {dst_n} are in {n} {src}?",
            "Express {n} {src} in {dst_n}.",
        ]
    ).format(n=n, src=src_n, dst_n=dst_n)
    reason = f"1 {src1} is {factor} {dst_n}"
    return prompt, fmt(f"{total} {dst_n}", reason)


def gen_capital(rng: random.Random) -> Item:
    """Make a country-to-capital (or capital-to-country) item."""
    country, city = rng.choice(CAPITALS)
    reason = f"{city} is the capital city of {country}"
    if rng.random() < 0.25:
        prompt = rng.choice(
            [
                "{city} is the capital of which country?",
                "Which country has {city} as its capital?",
            ]
        ).format(city=city)
        return prompt, fmt(cap(country), reason)
    prompt = rng.choice(
        [
            "What is the capital of {c}?",
            "Name the capital city of {c}.",
            "Which city is the capital of {c}?",
        ]
    ).format(c=country)
    return prompt, fmt(city, reason)


def gen_antonym(rng: random.Random) -> Item:
    """Make an antonym item (either direction of a pair)."""
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    prompt = rng.choice(
        [
            "What is the opposite of '{w}'?",
            "Give an antonym for '{w}'.",
            "Name a word that means the opposite of '{w}'.",
        ]
    ).format(w=a)
    return prompt, fmt(b, f"'{b}' is the opposite of '{a}'")


def gen_plural(rng: random.Random) -> Item:
    """Make a plural item, with the spelling rule as the reason."""
    s, p, rule = rng.choice(PLURALS)
    prompt = rng.choice(
        [
            "What is the plural of '{s}'?",
            "Give the plural form of '{s}'.",
            "Write the plural of the noun '{s}'.",
        ]
    ).format(s=s)
    return prompt, fmt(p, PLURAL_REASONS[rule].format(s=s))


def gen_day(rng: random.Random) -> Item:
    """Make a day-of-week item, one to three days after or before."""
    i = rng.randrange(7)
    k = rng.choice([1, 1, 2, 3])
    after = rng.random() < 0.5
    day = DAYS[i]
    target = DAYS[(i + k) % 7] if after else DAYS[(i - k) % 7]
    word = "after" if after else "before"
    if k == 1:
        if after:
            templates = [
                "What day comes after {d}?",
                "If today is {d}, what day is tomorrow?",
                "Which day follows {d}?",
            ]
        else:
            templates = [
                "What day comes before {d}?",
                "If today is {d}, what day was yesterday?",
                "Which day comes just before {d}?",
            ]
        prompt = rng.choice(templates).format(d=day)
    else:
        prompt = rng.choice(
            [
                "What day is {k} days {w} {d}?",
                "If today is {d}, what day is it {k} days {w}?",
                "Which day of the week is {k} days {w} {d}?",
            ]
        ).format(k=NUMBER_WORDS[k], w=word, d=day)
    days = "day" if k == 1 else "days"
    return prompt, fmt(target, f"{target} is {NUMBER_WORDS[k]} {days} {word} {day}")


def gen_month(rng: random.Random) -> Item:
    """Make an item about the month directly after or before another."""
    i = rng.randrange(12)
    month = MONTHS[i]
    if rng.random() < 0.5:
        target = MONTHS[(i + 1) % 12]
        prompt = rng.choice(
            [
                "What month comes after {m}?",
                "Which month follows {m}?",
                "Name the month after {m}.",
                "Which month comes next after {m}?",
            ]
        ).format(m=month)
        return prompt, fmt(target, f"{target} comes right after {month}")
    target = MONTHS[(i - 1) % 12]
    prompt = rng.choice(["What month comes before {m}?", "Which month is just before {m}?"]).format(m=month)
    return prompt, fmt(target, f"{target} comes right before {month}")


def gen_letters(rng: random.Random) -> Item:
    """Make a letter-counting item (word length or one letter)."""
    word = rng.choice(WORDS)
    spelled = "-".join(word)
    if rng.random() < 0.5:
        prompt = rng.choice(
            [
                "How many letters are in the word '{w}'?",
                "Count the letters in '{w}'.",
            ]
        ).format(w=word)
        return prompt, fmt(str(len(word)), f"{spelled} has {len(word)} letters")
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    prompt = rng.choice(
        [
            "How many times does the letter '{c}' appear in '{w}'?",
            "Count the letter '{c}' in the word '{w}'.",
        ]
    ).format(c=letter, w=word)
    times = "once" if n == 1 else f"{n} times"
    return prompt, fmt(str(n), f"{spelled} contains '{letter}' {times}")


def gen_sort(rng: random.Random) -> Item:
    """Make an item sorting three words with distinct first letters."""
    while True:
        words = rng.sample(WORDS, 3)
        if len({w[0] for w in words}) == 3:
            break
    ordered = sorted(words)
    prompt = rng.choice(
        [
            "Sort these words alphabetically: {w}.",
            "Put these words in alphabetical order: {w}.",
        ]
    ).format(w=", ".join(words))
    f0, f1, f2 = (w[0] for w in ordered)
    reason = f"{f0} comes before {f1}, and {f1} comes before {f2}"
    return prompt, fmt(", ".join(ordered), reason)


def gen_compare(rng: random.Random) -> Item:
    """Make an item picking the larger or smaller of two numbers."""
    a, b = rng.sample(range(2, 100), 2)
    hi, lo = max(a, b), min(a, b)
    if rng.random() < 0.5:
        prompt = rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"]).format(
            a=a, b=b
        )
        return prompt, fmt(str(hi), f"{hi} is greater than {lo}")
    prompt = rng.choice(["Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"]).format(
        a=a, b=b
    )
    return prompt, fmt(str(lo), f"{lo} is less than {hi}")


FAMILIES: dict[str, Callable[[random.Random], Item]] = {
    "arithmetic": gen_arithmetic,
    "conversion": gen_conversion,
    "capital": gen_capital,
    "antonym": gen_antonym,
    "plural": gen_plural,
    "day": gen_day,
    "month": gen_month,
    "letters": gen_letters,
    "sort": gen_sort,
    "compare": gen_compare,
}


class ItemPool:
    """Draws instruction items whose prompts are unique across all files."""

    def __init__(self, rng: random.Random) -> None:
        """Use ``rng`` for all draws."""
        self.rng = rng
        self.seen: set[str] = set()

    def draw(self, family: str) -> Item:
        """Return a fresh (prompt, response) pair from ``family``."""
        gen = FAMILIES[family]
        for _ in range(10_000):
            prompt, response = gen(self.rng)
            if prompt not in self.seen:
                self.seen.add(prompt)
                return prompt, response
        raise RuntimeError(f"family {family!r} ran out of unique prompts")

    def rows(self, counts: dict[str, int]) -> list[Row]:
        """Draw ``counts[family]`` items per family and shuffle them."""
        rows = [
            {"prompt": p, "response": r}
            for family, n in counts.items()
            for p, r in (self.draw(family) for _ in range(n))
        ]
        self.rng.shuffle(rows)
        return rows


SYSTEM_PROMPTS = [
    "You are a concise assistant. Reply as 'Answer: ... Reason: ...'.",
    "You are a helpful assistant that gives short, factual answers.",
    "Answer briefly and always explain your answer in one short reason.",
    "You are Flotilla's demo assistant. Keep every reply to one line.",
]


def make_instruction_sets(pool: ItemPool) -> dict[str, list[Row]]:
    """Build instruction train/val, the two mixture files and the chat file."""
    out: dict[str, list[Row]] = {}
    # Validation first, so train/mixtures/chat can never contain its prompts.
    out["instructions_val.jsonl"] = pool.rows(dict.fromkeys(FAMILIES, 6))
    out["instructions.jsonl"] = pool.rows(dict.fromkeys(FAMILIES, 40))
    out["mixture_math.jsonl"] = pool.rows({"arithmetic": 100})
    out["mixture_capitals.jsonl"] = pool.rows({"capital": 100})

    rng = sub_rng("chat")
    families = list(FAMILIES)
    chats: list[Row] = []
    for _ in range(200):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.3 else 1):
            prompt, response = pool.draw(rng.choice(families))
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": response})
        chats.append({"messages": messages})
    out["chat.jsonl"] = chats
    return out


# ---------------------------------------------------------------------------
# Sentiment reviews
# ---------------------------------------------------------------------------

# Per domain: "core" subjects (take domain-specific wording) and "other"
# subjects (general wording only). "{p}" is the product being reviewed.
SUBJECTS: dict[str, tuple[list[str], list[str]]] = {
    "restaurant": (
        [
            "the pasta",
            "the soup",
            "the steak",
            "the dessert",
            "the pizza",
            "the curry",
            "the coffee",
            "the salad",
            "the bread",
            "the fish",
            "the burger",
        ],
        ["the service", "the staff", "the atmosphere", "the wine list"],
    ),
    "movie": (
        [
            "the plot",
            "the acting",
            "the script",
            "the soundtrack",
            "the ending",
            "the lead actor",
            "the dialogue",
            "the story",
            "the final act",
            "the humor",
        ],
        ["the cinematography", "the pacing", "the cast", "the direction"],
    ),
    "product": (
        ["the {p}", "the build quality", "the material"],
        [
            "the design",
            "the price",
            "the manual",
            "the packaging",
            "the delivery",
            "the customer support",
            "the finish",
            "the color",
        ],
    ),
}

ITEM_NOUN = {"restaurant": "this place", "movie": "this film"}

PRODUCTS = [
    "kettle",
    "headset",
    "blender",
    "backpack",
    "desk lamp",
    "phone case",
    "vacuum cleaner",
    "laptop stand",
    "keyboard",
    "speaker",
    "camera",
    "coffee grinder",
    "water bottle",
    "rice cooker",
]

ADJECTIVES = {
    ("positive", "any"): [
        "excellent",
        "wonderful",
        "fantastic",
        "superb",
        "outstanding",
        "brilliant",
        "amazing",
        "lovely",
        "great",
        "perfect",
        "impressive",
        "delightful",
    ],
    ("negative", "any"): [
        "terrible",
        "awful",
        "horrible",
        "disappointing",
        "dreadful",
        "poor",
        "mediocre",
        "subpar",
        "unpleasant",
        "bad",
    ],
    ("positive", "restaurant"): ["delicious", "fresh", "tasty", "flavorful"],
    ("negative", "restaurant"): ["bland", "cold", "greasy", "stale", "tasteless"],
    ("positive", "movie"): ["gripping", "moving", "clever", "beautiful", "captivating"],
    ("negative", "movie"): ["boring", "dull", "predictable", "confusing", "tedious"],
    ("positive", "product"): ["reliable", "sturdy", "durable", "solid", "well made"],
    ("negative", "product"): ["flimsy", "faulty", "cheaply made", "unreliable"],
}

INTENSIFIERS = ["", "", "", "really ", "truly ", "absolutely "]

VERB_SENTENCES = {
    ("positive", "any"): [
        "I loved {s}.",
        "I was really happy with {s}.",
        "I was impressed by {s}.",
        "{S} made my day.",
    ],
    ("negative", "any"): [
        "I hated {s}.",
        "I was really unhappy with {s}.",
        "I was let down by {s}.",
        "{S} ruined it for me.",
    ],
    ("positive", "product"): ["{S} works perfectly.", "{S} exceeded my expectations."],
    ("negative", "product"): [
        "{S} stopped working after a week.",
        "{S} broke quickly.",
    ],
    ("positive", "movie"): ["{S} kept me hooked.", "{S} had me smiling throughout."],
    ("negative", "movie"): ["{S} put me to sleep.", "{S} made no sense at all."],
    ("positive", "restaurant"): ["{S} was cooked to perfection.", "{S} was a treat."],
    ("negative", "restaurant"): ["{S} was inedible.", "{S} made me feel sick."],
}

CLOSERS = {
    ("positive", "any"): [
        "I would definitely recommend {it}.",
        "Five stars.",
        "Highly recommended.",
        "A wonderful experience overall.",
        "I am very happy with {it}.",
    ],
    ("negative", "any"): [
        "I would not recommend {it}.",
        "One star.",
        "Avoid {it}.",
        "A terrible experience overall.",
        "I am very unhappy with {it}.",
    ],
    ("positive", "restaurant"): [
        "We will definitely come back.",
        "Best meal I have had in months.",
    ],
    ("negative", "restaurant"): [
        "We will not be coming back.",
        "Worst meal I have had in months.",
    ],
    ("positive", "movie"): [
        "I would happily watch it again.",
        "One of the best films this year.",
    ],
    ("negative", "movie"): [
        "I walked out halfway through.",
        "One of the worst films this year.",
    ],
    ("positive", "product"): ["Worth every penny.", "I would buy it again."],
    ("negative", "product"): ["A complete waste of money.", "I am returning it."],
}

FILLERS = {
    "restaurant": [
        "We went there on a {day} evening.",
        "We had a table for {n}.",
        "The restaurant is close to the train station.",
        "I ordered the set menu.",
        "We booked a table a week in advance.",
        "It was my first visit.",
        "We came for a birthday dinner.",
        "The menu changes every season.",
    ],
    "movie": [
        "I watched it on a {day} night.",
        "It runs a little over two hours.",
        "I saw it with {n} friends.",
        "The film is based on a novel.",
        "I watched it at home.",
        "It is the second film by this director.",
        "The trailer came out last spring.",
        "I went to an afternoon screening.",
    ],
    "product": [
        "The {p} arrived on {day}.",
        "I bought this {p} {n} weeks ago.",
        "It comes in a plain cardboard box.",
        "I use the {p} every day.",
        "I ordered the grey version.",
        "The {p} was a gift for my sister.",
        "Setup took about ten minutes.",
        "I bought it to replace my old {p}.",
    ],
}

MILD = {
    "positive": ["fine", "okay", "decent", "acceptable"],
    "negative": ["not perfect", "nothing special", "a little uneven", "not ideal"],
}


def _pick(
    rng: random.Random,
    table: dict[tuple[str, str], list[str]],
    label: str,
    domain: str | None,
) -> str:
    """Choose from the general list, plus the ``domain`` list when given."""
    options = table[(label, "any")]
    if domain is not None:
        options = options + table.get((label, domain), [])
    return rng.choice(options)


def make_review(rng: random.Random, domain: str, label: str) -> str:
    """Compose one short review with clear polarity plus neutral filler."""
    product = rng.choice(PRODUCTS)
    core = [s.format(p=product) for s in SUBJECTS[domain][0]]
    subjects = core + SUBJECTS[domain][1]
    item = f"this {product}" if domain == "product" else ITEM_NOUN[domain]
    parts: list[str] = []
    if rng.random() < 0.6:
        filler = rng.choice(FILLERS[domain])
        n = rng.choice(["two", "three", "four"])
        parts.append(filler.format(day=rng.choice(DAYS), n=n, p=product))
    picked = rng.sample(subjects, 3)
    for subj in picked[: rng.choice([1, 2, 2])]:
        scope = domain if subj in core else None
        if rng.random() < 0.65:
            adj = _pick(rng, ADJECTIVES, label, scope)
            parts.append(f"{cap(subj)} was {rng.choice(INTENSIFIERS)}{adj}.")
        else:
            template = _pick(rng, VERB_SENTENCES, label, scope)
            parts.append(template.format(s=subj, S=cap(subj)))
    if rng.random() < 0.2:
        other = "negative" if label == "positive" else "positive"
        adj = _pick(rng, ADJECTIVES, label, None)
        mild = rng.choice(MILD[other])
        parts.append(f"{cap(picked[2])} was {mild}, but overall it was {adj}.")
    if rng.random() < 0.75:
        parts.append(_pick(rng, CLOSERS, label, domain).format(it=item))
    return " ".join(parts)


class ReviewPool:
    """Draws reviews whose texts are unique across all sentiment files."""

    def __init__(self, rng: random.Random) -> None:
        """Use ``rng`` for all draws."""
        self.rng = rng
        self.seen: set[str] = set()

    def rows(self, cells: dict[tuple[str, str], int]) -> list[Row]:
        """Draw ``cells[(domain, label)]`` reviews per cell and shuffle them."""
        rows: list[Row] = []
        for (domain, label), n in cells.items():
            made = 0
            for _ in range(100 * n + 1000):
                if made == n:
                    break
                text = make_review(self.rng, domain, label)
                if text in self.seen:
                    continue
                self.seen.add(text)
                rows.append({"text": text, "label": label})
                made += 1
            else:
                raise RuntimeError(f"not enough unique reviews for {domain}/{label}")
        self.rng.shuffle(rows)
        return rows


def cells(**counts: tuple[int, int]) -> dict[tuple[str, str], int]:
    """Map ``domain=(n_negative, n_positive)`` to ``{(domain, label): n}``."""
    out: dict[tuple[str, str], int] = {}
    for domain, (neg, pos) in counts.items():
        out[(domain, "negative")] = neg
        out[(domain, "positive")] = pos
    return out


def make_sentiment_sets() -> dict[str, list[Row]]:
    """Build sentiment train/val, the three non-IID sites and shared validation."""
    pool = ReviewPool(sub_rng("sentiment"))
    out: dict[str, list[Row]] = {}
    # Held-out sets first; every file is disjoint from every other.
    out["sentiment_val.jsonl"] = pool.rows(cells(restaurant=(18, 22), movie=(18, 22), product=(18, 22)))
    out["sites/shared_val.jsonl"] = pool.rows(cells(restaurant=(20, 20), movie=(20, 20), product=(20, 20)))
    out["sentiment.jsonl"] = pool.rows(cells(restaurant=(72, 88), movie=(72, 88), product=(72, 88)))
    # site_a: restaurants, 70% positive; site_b: movies, 70% negative;
    # site_c: products, balanced.
    out["sites/site_a.jsonl"] = pool.rows(cells(restaurant=(36, 84), movie=(4, 11), product=(5, 10)))
    out["sites/site_b.jsonl"] = pool.rows(cells(movie=(84, 36), restaurant=(11, 4), product=(10, 5)))
    out["sites/site_c.jsonl"] = pool.rows(cells(product=(60, 60), restaurant=(7, 8), movie=(8, 7)))
    return out


# ---------------------------------------------------------------------------
# Deliberately broken files for loader error tests
# ---------------------------------------------------------------------------

BAD_ROWS: list[Row] = [
    {"prompt": "What is 2 + 3?", "response": "Answer: 5. Reason: 2 + 3 = 5."},
    {
        "prompt": "What is the opposite of 'up'?",
        "response": fmt("down", "'down' is the opposite of 'up'"),
    },
    {
        "prompt": "What day comes after Monday?",
        "response": fmt("Tuesday", "Tuesday is one day after Monday"),
    },
    {
        "prompt": "What is the plural of 'cat'?",
        "response": fmt("cats", "most nouns simply add -s"),
    },
    {
        "prompt": "What is the capital of Peru?",
        "response": fmt("Lima", "Lima is the capital city of Peru"),
    },
]


def make_bad_files() -> dict[str, list[str]]:
    """Return the lines of the three malformed instruction files."""
    good = [json.dumps(r, ensure_ascii=False) for r in BAD_ROWS]
    bad_json = list(good)
    # Line 3: truncated object (missing closing quote and brace).
    bad_json[2] = '{"prompt": "What day comes after Monday?", "response": "Answer: Tue'
    missing = list(good)
    missing[1] = json.dumps({"prompt": BAD_ROWS[1]["prompt"]})  # line 2: no response
    wrong = list(good)
    wrong[3] = json.dumps({"prompt": BAD_ROWS[3]["prompt"], "response": 42})  # line 4
    return {
        "bad/bad_json.jsonl": bad_json,
        "bad/missing_field.jsonl": missing,
        "bad/wrong_type.jsonl": wrong,
    }


# ---------------------------------------------------------------------------
# Realistic (long-tailed) lengths for padding vs packing benchmarks
# ---------------------------------------------------------------------------

TOKENS_PER_WORD = 1.3

GROUPS = [
    "the town council",
    "a group of volunteers",
    "the local library",
    "the cycling club",
    "a small software team",
    "the school garden project",
    "the bakery cooperative",
    "the harbor museum",
    "a neighborhood choir",
    "the community radio station",
    "a family-run farm",
    "the regional bus company",
]

PLACES = [
    "Millbrook",
    "Northfield",
    "the river valley",
    "the old harbor district",
    "a small coastal town",
    "the university campus",
    "Eastwick",
    "the hill villages",
    "Oakridge",
    "the city center",
]

TOPICS = [
    "public transport",
    "recycling",
    "reading habits",
    "local history",
    "energy use",
    "street safety",
    "food waste",
    "youth sports",
    "water quality",
    "small businesses",
]

SENTENCES = [
    "{G} in {P} started a new project on {T} in {M} {Y}.",
    "At first only {n} people took part, but the number grew steadily.",
    "By the end of the year, participation had risen by about {pct} percent.",
    "Several members said the weekly meetings helped them stay motivated.",
    "The budget was small, so most of the materials were donated.",
    "A local newspaper wrote a short article about the work in {M}.",
    "Some residents worried about noise and traffic near {P}.",
    "The organizers responded by moving most events to weekend mornings.",
    "Volunteers kept careful records of costs, hours and results.",
    "In {Y}, the group received a grant of {n} thousand dollars.",
    "The money was used to buy equipment and to train new volunteers.",
    "A survey of {n0} households showed strong support for the idea.",
    "Not everyone agreed, and a few people asked for a public meeting.",
    "The meeting took place in {M} and lasted almost three hours.",
    "Afterwards, {g} published a short plan with clear goals for {T}.",
    "One goal was to cut costs by {pct} percent within two years.",
    "Another goal was to involve more young people in the project.",
    "The first results were mixed, but the trend was clearly positive.",
    "Weather caused delays in {M}, when heavy rain closed several roads.",
    "A second survey in {Y} found that {pct} percent of people had noticed a change.",
    "Local schools joined in and organized lessons about {T}.",
    "Teachers reported that students enjoyed the practical activities.",
    "The project also attracted visitors from {P2}.",
    "Some visitors later started similar projects in their own towns.",
    "Costs rose slightly in the second year because of higher prices.",
    "Even so, the group managed to stay within its budget.",
    "A small committee now reviews the progress every {n1} months.",
    "Their latest report recommends continuing the work for another year.",
    "The report also suggests sharing data openly with other groups.",
    "Most people interviewed described the project as useful and well run.",
]

TIP_ACTIONS = [
    "Check your tools",
    "Write down your main goals",
    "Review your progress",
    "Make a simple checklist",
    "Set a small weekly budget",
    "Keep your notes in one place",
    "Tidy the space you work in",
    "Plan a realistic timeline",
    "Ask someone for honest feedback",
    "Take a short break",
    "Look back at your most common mistakes",
    "Prepare a backup plan",
    "Write down the questions you still have",
    "Compare prices",
    "Label your materials",
    "Track the time you spend",
    "Set one small target",
    "Celebrate the progress you made",
]

TIP_WHEN = [
    "before you begin",
    "at the end of each week",
    "every morning",
    "together with a friend",
    "so that nothing is forgotten",
    "whenever something changes",
    "after each session",
    "once a month",
    "before buying anything new",
    "while the details are still fresh",
]

ACTIVITIES = [
    "keeping a vegetable garden",
    "preparing for a long hike",
    "organizing a small office",
    "learning a new language",
    "reducing household energy use",
    "writing clear emails",
    "training for a first 10k run",
    "setting up a home workshop",
    "running a book club",
    "planning a family trip",
    "starting a small online shop",
    "studying for an exam",
]


def make_sentences(rng: random.Random, n_words: int, place: str, topic: str) -> list[str]:
    """Write sentences about ``topic`` in ``place`` until ~``n_words`` words.

    Templates are dealt from a shuffled deck so none repeats before all are used.
    """
    group = rng.choice(GROUPS)
    deck: list[str] = []
    sentences: list[str] = []
    words = 0
    while words < n_words:
        if not deck:
            deck = list(SENTENCES)
            rng.shuffle(deck)
        sentence = deck.pop().format(
            G=cap(group),
            g=group,
            P=place,
            P2=rng.choice([p for p in PLACES if p != place]),
            T=topic,
            M=rng.choice(MONTHS),
            Y=rng.randint(2012, 2023),
            n=rng.randint(5, 60),
            n0=rng.randint(100, 900),
            n1=rng.choice([2, 3, 4, 6]),
            pct=rng.randint(5, 45),
        )
        sentences.append(sentence)
        words += len(sentence.split())
    return sentences


def make_text(sentences: Sequence[str]) -> str:
    """Join sentences into paragraphs of at most six sentences."""
    paras = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]
    return "\n\n".join(paras)


def make_tips(rng: random.Random, n_words: int) -> tuple[int, str]:
    """Return ``(count, numbered list)`` of tips totalling about ``n_words``."""
    tips: list[str] = []
    words = 0
    combos = [f"{a} {w}." for a in TIP_ACTIONS for w in TIP_WHEN]
    rng.shuffle(combos)
    while (words < n_words or not tips) and combos:
        tip = combos.pop()
        tips.append(f"{len(tips) + 1}. {tip}")
        words += len(tip.split()) + 1
    return len(tips), "\n".join(tips)


def make_long_row(rng: random.Random, n_tokens: int) -> Row:
    """Build one instruction row of roughly ``n_tokens`` Llama tokens."""
    n_words = round(n_tokens / TOKENS_PER_WORD)
    if n_words < 30:
        prompt, response = FAMILIES[rng.choice(list(FAMILIES))](rng)
        return {"prompt": prompt, "response": response}
    kind = rng.choice(["summary", "tips", "report", "notes"])
    place, topic = rng.choice(PLACES), rng.choice(TOPICS)
    if kind == "summary":
        sentences = make_sentences(rng, n_words - 25, place, topic)
        prompt = f"Summarize the following text in two sentences.\n\n{make_text(sentences)}"
        response = f"{sentences[0]} {rng.choice(sentences[1:] or sentences)}"
    elif kind == "tips":
        count, tips = make_tips(rng, n_words - 12)
        activity = rng.choice(ACTIVITIES)
        prompt = f"List {count} practical tips for {activity}."
        response = tips
    elif kind == "report":
        sentences = make_sentences(rng, n_words - 10, place, topic)
        prompt = f"Write a short report about {topic} in {place}."
        response = make_text(sentences)
    else:
        sentences = make_sentences(rng, (n_words - 12) // 2, place, topic)
        notes = "\n".join(f"- {s.rstrip('.')}" for s in sentences)
        prompt = f"Rewrite these notes about {topic} as a paragraph.\n\n{notes}"
        response = " ".join(sentences)
    return {"prompt": prompt, "response": response}


def make_realistic_lengths(exclude: set[str], n_rows: int = 600) -> list[Row]:
    """Make rows whose token lengths follow a clipped log-normal (~20 to ~900).

    Prompts in ``exclude`` (the instruction files) are never reused.
    """
    rng = sub_rng("realistic_lengths")
    rows: list[Row] = []
    seen = set(exclude)
    while len(rows) < n_rows:
        n_tokens = int(min(850, max(24, rng.lognormvariate(math.log(130), 0.75))))
        row = make_long_row(rng, n_tokens)
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def build_all() -> tuple[dict[str, list[Row]], dict[str, list[str]]]:
    """Return all JSONL datasets and the raw lines of the bad files."""
    datasets: dict[str, list[Row]] = {}
    pool = ItemPool(sub_rng("instructions"))
    datasets.update(make_instruction_sets(pool))
    datasets.update(make_sentiment_sets())
    datasets["realistic_lengths.jsonl"] = make_realistic_lengths(pool.seen)
    return datasets, make_bad_files()


def main(argv: Sequence[str] | None = None) -> None:
    """Write every dataset under ``--out`` (default: this file's directory)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    datasets, bad = build_all()
    for name, rows in datasets.items():
        write_jsonl(args.out / name, rows)
        print(f"{name}: {len(rows)} rows")
    for name, lines in bad.items():
        write_lines(args.out / name, lines)
        print(f"{name}: {len(lines)} lines")


if __name__ == "__main__":
    main()
