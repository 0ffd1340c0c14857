"""Sentences for the synthetic corpus: word lists and a small grammar, drawn with a seeded RNG.

A clause is "NP [ADV] VERB NP [PREP NP]"; a sentence is one clause or two joined by a
conjunction. With ``max_words`` below 10, sentences are short noun phrases instead.
"""

from __future__ import annotations

import random

from cnn_mellin.errors import DataError

_DETERMINERS = "the the the every each this that my his her our your their one some".split()
_ADJECTIVES = """able ancient angry awkward bitter black blue bold brave brief bright broad broken
brown busy calm careful cheap chilly clever cloudy cold crooked cruel curious damp dark deep
delicate distant dry dusty eager early empty endless enormous fancy fierce foggy fragile fresh
friendly frozen gentle giant glad golden good grassy gray greasy green happy harsh heavy hidden
hollow honest huge humble hungry icy jolly juicy kind large lazy little lonely loud lucky mellow
merry mighty modest muddy narrow nervous noisy odd orange pale patient pleasant plain polite poor
proud purple quick quiet rapid rare rough round royal rusty sad salty scarlet shallow sharp shiny
short silent silver simple sleepy slim slow small smooth soft sour spotted steady steep sticky
stormy strange strong sunny sweet tall tame thick thin tidy tiny tough usual vast violet visual
warm weary wet white wide wild wise wooden yellow young zealous""".split()
_NOUNS = """actor anchor apple artist baker balloon banker basket beach beaver bell bicycle bird
blanket boat bottle boy bridge brother bucket butcher button cabin camel candle canyon captain
carpet castle cat cellar chair cherry child church circle city closet cloud clown coach coin
collar cottage cousin cowboy crab crayon cushion daughter desert doctor dog doll donkey dragon
drawer driver drum duck eagle engine farmer feather fence fisherman flower forest fox frog garage
garden giraffe girl goat guitar hammer harbor hat hedge helmet horse island jacket jewel judge
kettle king kitchen kitten ladder lamp lawyer leather lemon letter lion lizard magazine measure
merchant meadow mirror monkey mountain mouse museum nephew nurse ocean orchard owl oyster painter
palace parrot pebble pencil penguin pepper piano pillow pilot pirate planet pocket poet pony puppy
puzzle queen rabbit river robot rocket sailor saucer scholar shadow sheep shepherd shoe singer
sister soldier spider squirrel stranger student sugar table teacher tiger toy tractor treasure
tunnel turtle uncle valley village violin vision wagon waiter wallet whistle widow window wizard
woman worker yard zebra""".split()
_VERBS = """admired avoided baked borrowed bought brought built buried carried caught chased
cleaned climbed collected copied covered crushed dropped enjoyed fetched filled followed found
grabbed guarded hid hugged joined kicked kissed lifted liked loaded lost loved moved noticed opened
packed painted passed pulled pushed reached rescued ruined sold searched shook showed sketched
smelled squeezed stole stretched studied tasted taught thanked threw touched traded visited washed
watched weighed wrapped""".split()
_ADVERBS = """almost always boldly briefly calmly carefully cheerfully clearly eagerly easily
finally gently gladly happily honestly hungrily loudly merrily nearly never often openly patiently
politely proudly quickly quietly rarely really sadly seldom slowly softly suddenly surely swiftly
usually warmly wearily wisely""".split()
_PREPOSITIONS = """above across after against along among around behind below beneath beside
between beyond by near inside outside over through toward under underneath with within
without""".split()
_CONJUNCTIONS = "while because and but before after when although since until".split()
_MIN_WORDS, _MAX_WORDS = 10, 18

# Read by every speaker, like TIMIT's SA sentences (and, like them, left out by prep).
SA_SENTENCES = (
    "A curious child watched the yellow ship sail through the harbor at dawn.",
    "Joyful voices rang out as the brave pilot measured each thin rope.",
)


def _sentence(rng: random.Random) -> str:
    def noun_phrase() -> list[str]:
        words = [rng.choice(_DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rng.choice(_ADJECTIVES))
        return words + [rng.choice(_NOUNS)]

    def clause() -> list[str]:
        words = noun_phrase()
        if rng.random() < 0.4:
            words.append(rng.choice(_ADVERBS))
        words += [rng.choice(_VERBS)] + noun_phrase()
        if rng.random() < 0.6:
            words += [rng.choice(_PREPOSITIONS)] + noun_phrase()
        return words

    words = clause()
    if rng.random() < 0.7:
        words[-1] += ","
        words += [rng.choice(_CONJUNCTIONS)] + clause()
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def _short_sentence(rng: random.Random, max_words: int) -> str:
    """A noun phrase, with a verb when there is room: "The quiet owl.", "A dog hid."."""
    words = [rng.choice(_DETERMINERS)]
    if len(words) + 2 <= max_words and rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if len(words) < max_words and rng.random() < 0.5:
        words.append(rng.choice(_VERBS))
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def make_sentences(count: int, seed: int = 0, max_words: int | None = None) -> list[str]:
    """``count`` distinct sentences of 10 to 18 words (of 2 to ``max_words`` words when that is
    below 10), the same for the same seed."""
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int)
                                  or max_words < 2):
        raise DataError(f"--max-words must be an integer >= 2, got {max_words!r}")
    short = max_words is not None and max_words < _MIN_WORDS
    low, high = (2, max_words) if short else (_MIN_WORDS, min(_MAX_WORDS, max_words or _MAX_WORDS))
    rng = random.Random(seed)
    seen: set[str] = set(SA_SENTENCES)
    out = []
    misses = 0
    while len(out) < count:
        text = _short_sentence(rng, max_words) if short else _sentence(rng)
        if low <= len(text.split()) <= high and text not in seen:
            seen.add(text)
            out.append(text)
            misses = 0
        else:
            misses += 1
            if misses > 100_000:
                raise DataError(f"cannot make {count} distinct sentences of at most "
                                f"{max_words} words (made {len(out)}); use fewer --utterances")
    return out
