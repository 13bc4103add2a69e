"""Regenerates the shipped default corpus (`corpus.txt`) and its byte-level BPE tokenizer
(`tokenizer.json`). Both are committed; this script is how they were made, so they can be
rebuilt bit-for-bit: `python -m horizon.assets.make_assets`.

The corpus is ours: a few passages of clearly public-domain English (nineteenth-century and
older, written down from memory, so wording may differ from any edition) plus generated text
with regular structure (small stories, counting, arithmetic) that a model of a few million
parameters visibly learns within a couple of hundred steps.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

PUBLIC_DOMAIN = [
    # Abraham Lincoln, address at Gettysburg, 1863.
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that war. "
    "We have come to dedicate a portion of that field, as a final resting place for those who here "
    "gave their lives that that nation might live. It is altogether fitting and proper that we "
    "should do this. But, in a larger sense, we can not dedicate, we can not consecrate, we can not "
    "hallow this ground. The brave men, living and dead, who struggled here, have consecrated it, "
    "far above our poor power to add or detract. The world will little note, nor long remember what "
    "we say here, but it can never forget what they did here. It is for us the living, rather, to be "
    "dedicated here to the unfinished work which they who fought here have thus far so nobly "
    "advanced. It is rather for us to be here dedicated to the great task remaining before us, that "
    "from these honored dead we take increased devotion to that cause for which they gave the last "
    "full measure of devotion, that we here highly resolve that these dead shall not have died in "
    "vain, that this nation, under God, shall have a new birth of freedom, and that government of "
    "the people, by the people, for the people, shall not perish from the earth.",
    # Genesis 1:1-5, King James Version, 1611.
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of "
    "the waters. And God said, Let there be light: and there was light. And God saw the light, that "
    "it was good: and God divided the light from the darkness. And God called the light Day, and the "
    "darkness he called Night. And the evening and the morning were the first day.",
    # Psalm 23, King James Version, 1611.
    "The Lord is my shepherd; I shall not want. He maketh me to lie down in green pastures: he "
    "leadeth me beside the still waters. He restoreth my soul: he leadeth me in the paths of "
    "righteousness for his name's sake. Yea, though I walk through the valley of the shadow of "
    "death, I will fear no evil: for thou art with me; thy rod and thy staff they comfort me. Thou "
    "preparest a table before me in the presence of mine enemies: thou anointest my head with oil; "
    "my cup runneth over. Surely goodness and mercy shall follow me all the days of my life: and I "
    "will dwell in the house of the Lord for ever.",
    # Sarah Josepha Hale, 1830.
    "Mary had a little lamb, its fleece was white as snow; and everywhere that Mary went, the lamb "
    "was sure to go. It followed her to school one day, which was against the rule; it made the "
    "children laugh and play, to see a lamb at school.",
    # Jane Taylor, 1806.
    "Twinkle, twinkle, little star, how I wonder what you are! Up above the world so high, like a "
    "diamond in the sky. When the blazing sun is gone, when he nothing shines upon, then you show "
    "your little light, twinkle, twinkle, all the night.",
    # Traditional rhymes, eighteenth century or older.
    "Humpty Dumpty sat on a wall, Humpty Dumpty had a great fall. All the king's horses and all the "
    "king's men couldn't put Humpty together again.",
    "Jack and Jill went up the hill to fetch a pail of water. Jack fell down and broke his crown, "
    "and Jill came tumbling after.",
    "Hey diddle diddle, the cat and the fiddle, the cow jumped over the moon. The little dog laughed "
    "to see such sport, and the dish ran away with the spoon.",
    "Baa, baa, black sheep, have you any wool? Yes sir, yes sir, three bags full. One for the "
    "master, one for the dame, and one for the little boy who lives down the lane.",
    # Aesop, retold in our own words.
    "A hare laughed at a tortoise for being slow. The tortoise said, let us race, and we shall see. "
    "The hare ran far ahead, then lay down to sleep. The tortoise walked on and on without resting, "
    "and when the hare woke, the tortoise had already crossed the line. Slow and steady wins the race.",
    "A thirsty crow found a pitcher with a little water at the bottom. Its beak could not reach it. "
    "The crow dropped pebbles into the pitcher one by one, and the water rose until the crow could "
    "drink. Little by little does the trick.",
    "A fox saw grapes hanging high on a vine. He jumped and jumped but could not reach them. At last "
    "he walked away and said, those grapes are sour anyway. It is easy to despise what you cannot get.",
    "A shepherd boy cried wolf to trick the villagers, and they ran to help him, but there was no "
    "wolf. He did it again, and again they came. Then a wolf really came, and the boy cried wolf, but "
    "no one came. Nobody believes a liar, even when he tells the truth.",
]

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Finn", "Grace", "Henry", "Ida", "Jack",
         "Kate", "Leo", "Mia", "Noah", "Olive", "Paul"]
ANIMALS = ["cat", "dog", "fox", "bird", "horse", "cow", "sheep", "rabbit", "mouse", "duck"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
PLACES = ["the river", "the forest", "the garden", "the hill", "the village", "the field",
          "the lake", "the market"]
THINGS = ["apple", "ball", "book", "cake", "hat", "kite", "lamp", "rope", "stone", "cup"]
FEELINGS = ["happy", "tired", "hungry", "sleepy", "glad", "curious"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


def _story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    animal = rng.choice(ANIMALS)
    color = rng.choice(COLORS)
    place = rng.choice(PLACES)
    thing = rng.choice(THINGS)
    feeling = rng.choice(FEELINGS)
    n = rng.randint(2, 9)
    pron = "she" if NAMES.index(name) % 2 == 0 else "he"
    return (
        f"{name} went to {place} with a {color} {animal}. "
        f"At {place}, {name} found {NUMBER_WORDS[n]} {thing}s. "
        f"The {animal} took one {thing}, so {name} had {NUMBER_WORDS[n - 1]} {thing}s left. "
        f"{name} was {feeling}, and {pron} walked home with the {color} {animal}."
    )


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"{a} plus {b} is {a + b}. {NUMBER_WORDS[a]} and {NUMBER_WORDS[b]} make {a + b}."
    a, b = max(a, b), min(a, b)
    return f"{a} minus {b} is {a - b}. take {NUMBER_WORDS[b]} from {NUMBER_WORDS[a]} and {a - b} remain."


def _counting(rng: random.Random) -> str:
    start = rng.randint(1, 20)
    step = rng.choice([1, 2, 3, 5, 10])
    seq = ", ".join(str(start + i * step) for i in range(8))
    return f"Counting by {step} from {start}: {seq}."


def build_corpus(target_bytes: int = 240_000, seed: int = 1863) -> str:
    rng = random.Random(seed)
    parts = list(PUBLIC_DOMAIN)
    size = sum(len(p) + 2 for p in parts)
    makers = [_story, _story, _story, _arithmetic, _counting]
    while size < target_bytes:
        p = rng.choice(makers)(rng)
        parts.append(p)
        size += len(p) + 2
    # Interleave the public-domain passages through the generated text so every shuffled
    # window mixes both.
    fixed, gen = parts[: len(PUBLIC_DOMAIN)], parts[len(PUBLIC_DOMAIN):]
    stride = max(1, len(gen) // (len(fixed) * 4))
    out = []
    fi = 0
    for i, g in enumerate(gen):
        if i % stride == 0:
            out.append(fixed[fi % len(fixed)])
            fi += 1
        out.append(g)
    # Blank lines separate documents in plain-text data (see horizon.data.sources).
    return "\n\n".join(out) + "\n"


def build_tokenizer(corpus_path: Path, out_path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus_path)], trainer)
    tok.save(str(out_path))


def main() -> None:
    corpus = HERE / "corpus.txt"
    corpus.write_text(build_corpus(), encoding="utf-8")
    build_tokenizer(corpus, HERE / "tokenizer.json")
    print(f"wrote {corpus} ({corpus.stat().st_size} bytes) and {HERE / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
