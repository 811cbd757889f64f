"""Text normalisation before WER / CER, after Whisper's normalisers (openai/whisper ``normalizers``).

Word error rates are only comparable after both sides are normalised the same way: "Mr. Smith
paid $5" and "mister smith paid five dollars" are the same words. The English normaliser applies
these rules, in this order (Whisper's ``EnglishTextNormalizer``, condensed):

1. lower case; text in ``[...]``, ``<...>`` and ``(...)`` removed (non-speech annotations);
2. hesitations removed: hmm, mm, mhm, mmm, uh, um;
3. contractions expanded (won't -> will not, can't -> can not, n't -> not, 're -> are, 's -> is,
   'd -> would, 'll -> will, 've -> have, 'm -> am, gonna -> going to, ...), titles spelled out
   (mr -> mister, mrs -> missus, dr -> doctor, st -> saint, jr -> junior, ...);
4. commas inside numbers dropped (1,000 -> 1000), periods not followed by a digit dropped;
5. accents removed (café -> cafe, æ -> ae, ß -> ss), every other symbol and punctuation mark
   becomes a space except those of numbers (. % $ £ € ¢);
6. spelled-out numbers become digits: "twenty five" -> 25, "one hundred and five" -> 105,
   "two point five" -> 2.5, "nineteen ninety" -> 1990, "twenty first" -> 21st, "five percent"
   -> 5%, "ten dollars" -> $10 (also pounds £, euros €, cents ¢); "5 million" -> 5000000;
7. British spellings of common words become American (colour -> color; a short list, where
   Whisper ships a dictionary of ~1,700);
8. currency and percent signs not attached to a number dropped; whitespace collapsed.

The basic normaliser (any other language; Whisper's ``BasicTextNormalizer``): case folded, text in
brackets or parentheses removed, every punctuation mark and symbol becomes a space (accents
kept: they change words in most languages), whitespace collapsed.
"""

from __future__ import annotations

import re
import unicodedata

FILLERS = re.compile(r"\b(hmm|mm|mhm|mmm|uh|um)\b")
BRACKETS = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]*\)")

# step 3, Whisper's replacers (the order matters: specific contractions before the generic suffixes)
REPLACERS = [(re.compile(p), r) for p, r in [
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\blet's\b", "let us"), (r"\bain't\b", "aint"),
    (r"\by'all\b", "you all"), (r"\bwanna\b", "want to"), (r"\bgotta\b", "got to"), (r"\bgonna\b", "going to"),
    (r"\bi'ma\b", "i am going to"), (r"\bimma\b", "i am going to"), (r"\bwoulda\b", "would have"),
    (r"\bcoulda\b", "could have"), (r"\bshoulda\b", "should have"), (r"\bma'am\b", "madam"),
    (r"\bmr\b", "mister "), (r"\bmrs\b", "missus "), (r"\bst\b", "saint "), (r"\bdr\b", "doctor "),
    (r"\bprof\b", "professor "), (r"\bcapt\b", "captain "), (r"\bgov\b", "governor "), (r"\bald\b", "alderman "),
    (r"\bgen\b", "general "), (r"\bsen\b", "senator "), (r"\brep\b", "representative "),
    (r"\bpres\b", "president "), (r"\brev\b", "reverend "), (r"\bhon\b", "honorable "),
    (r"\basst\b", "assistant "), (r"\bassoc\b", "associate "), (r"\blt\b", "lieutenant "),
    (r"\bcol\b", "colonel "), (r"\bjr\b", "junior "), (r"\bsr\b", "senior "), (r"\besq\b", "esquire "),
    (r"'d been\b", " had been"), (r"'s been\b", " has been"), (r"'d gone\b", " had gone"),
    (r"'s gone\b", " has gone"), (r"'d done\b", " had done"), (r"'s got\b", " has got"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'s\b", " is"), (r"'d\b", " would"), (r"'ll\b", " will"),
    (r"'t\b", " not"), (r"'ve\b", " have"), (r"'m\b", " am"),
]]

# step 5: letters NFKD does not decompose
LETTERS = {"œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "ß": "ss", "ẞ": "SS", "đ": "d",
           "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "th", "ł": "l", "Ł": "L"}
KEEP_SYMBOLS = set(".%$¢€£")

ONES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
MULTIPLIERS = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
ORDINAL_ONES = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
                "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
                "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18,
                "nineteenth": 19}
ORDINAL_TENS = {w[:-1] + "ieth": v for w, v in TENS.items()}
ORDINAL_MULT = {w + "th": v for w, v in MULTIPLIERS.items()}
CURRENCY = {"dollar": "$", "dollars": "$", "pound": "£", "pounds": "£", "euro": "€", "euros": "€",
            "cent": "¢", "cents": "¢"}

# step 7: a short list of the British spellings most common in read speech (Whisper: english.json)
SPELLINGS = {w: a for pair in """
colour color colours colors coloured colored favourite favorite favourites favorites favour favor
favours favors favoured favored honour honor honours honors honoured honored labour labor neighbour neighbor
neighbours neighbors neighbourhood neighborhood behaviour behavior humour humor harbour harbor rumour rumor
vapour vapor flavour flavor savour savor splendour splendor vigour vigor valour valor armour armor
endeavour endeavor parlour parlor odour odor clamour clamor rancour rancor glamour glamor saviour savior
centre center centres centers theatre theater metre meter metres meters litre liter fibre fiber
sombre somber spectre specter calibre caliber grey gray greyish grayish jewellery jewelry travelled traveled
travelling traveling traveller traveler cancelled canceled cancelling canceling marvellous marvelous
jewellery jewelry programme program programmes programs cheque check defence defense offence offense
licence license practise practice analyse analyze realise realize realised realized organise organize
organised organized recognise recognize recognised recognized apologise apologize civilisation civilization
catalogue catalog dialogue dialog plough plow moustache mustache sceptical skeptical kerb curb tyre tire
""".split("\n") for w, a in zip(pair.split()[::2], pair.split()[1::2])}


def _remove_symbols(s: str, *, keep_accents: bool, keep: set[str] = frozenset()) -> str:
    """Punctuation and symbols (Unicode categories P*, S*) become spaces; accents are dropped
    unless ``keep_accents`` (marks M* then stay with their letters)."""
    out = []
    for c in unicodedata.normalize("NFKC" if keep_accents else "NFKD", s):
        if c in keep:
            out.append(c)
        elif not keep_accents and c in LETTERS:
            out.append(LETTERS[c])
        elif unicodedata.category(c) == "Mn" and not keep_accents:
            continue
        elif unicodedata.category(c)[0] in "PS" or (unicodedata.category(c)[0] == "M" and not keep_accents):
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def _spoken_number(words: list[str], i: int) -> tuple[str, int] | None:
    """The number spelled from words[i] on: (its digits, the index after it), or None."""
    total, current, j, n = 0, 0, i, len(words)
    last = None  # kind of the word before: "one" (0-9), "teen" (10-19), "tens", "mult", None
    suffix = ""
    while j < n:
        w = words[j]
        if w.isdigit() and last is None:  # "5 million": a written number that a multiplier follows
            if j + 1 < n and words[j + 1] in MULTIPLIERS:
                current, last = int(w), "one"
                j += 1
                continue
            return None
        if w in ONES or w in ORDINAL_ONES:
            v = ONES.get(w, ORDINAL_ONES.get(w))
            # a ones word after a ones or teens word starts a new number ("one two" is 1 2)
            if last in ("one", "teen") or (last == "tens" and v >= 10):
                if v >= 10:
                    year = _year(words, j, total, current)
                    if year is not None:
                        return year
                break
            current += v
            last = "one" if v < 10 else "teen"
        elif w in TENS or w in ORDINAL_TENS:
            if last in ("one", "tens", "teen"):
                year = _year(words, j, total, current)
                if year is not None:
                    return year
                break
            current += TENS.get(w, ORDINAL_TENS.get(w))
            last = "tens"
        elif w in MULTIPLIERS or w in ORDINAL_MULT:
            m = MULTIPLIERS.get(w, ORDINAL_MULT.get(w))
            if last is None or last == "mult" and m != 100 and current == 0:
                break
            if m == 100:
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * m
                current = 0
            last = "mult"
        elif w == "and" and last == "mult" and j + 1 < n and (words[j + 1] in ONES or words[j + 1] in TENS):
            j += 1  # "one hundred and five"
            continue
        else:
            break
        j += 1
        if w in ORDINAL_ONES or w in ORDINAL_TENS or w in ORDINAL_MULT:
            v = (total + current) % 100
            suffix = "th" if 10 <= v % 100 <= 19 else {1: "st", 2: "nd", 3: "rd"}.get(v % 10, "th")
            break
    if last is None:
        return None
    value = total + current
    text = str(value)
    if not suffix and j + 1 < n and words[j] == "point" and words[j + 1] in ONES and ONES[words[j + 1]] < 10:
        digits = []
        j += 1
        while j < n and words[j] in ONES and ONES[words[j]] < 10:
            digits.append(str(ONES[words[j]]))
            j += 1
        text += "." + "".join(digits)
    return text + suffix, j


def _year(words: list[str], j: int, total: int, current: int) -> tuple[str, int] | None:
    """Two two-digit numbers side by side are read as one ("nineteen ninety" -> 1990, "twenty
    twenty one" -> 2021), the way years are spoken; None when words[j:] does not continue so."""
    if total or not 10 <= current <= 99:
        return None
    rest = _spoken_number(words, j)
    if rest is not None and rest[0].isdigit() and len(rest[0]) == 2:
        return str(current) + rest[0], rest[1]
    return None


def _standardize_numbers(s: str) -> str:
    words = s.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        got = _spoken_number(words, i)
        if got is None:
            out.append(words[i])
            i += 1
            continue
        text, i = got
        out.append(text)
    # units after a number: 5 percent -> 5%, 10 dollars -> $10
    merged: list[str] = []
    for w in out:
        prev = merged[-1] if merged else ""
        if re.fullmatch(r"\d+(\.\d+)?", prev) and w in ("percent", "per cent"):
            merged[-1] = prev + "%"
        elif re.fullmatch(r"\d+(\.\d+)?", prev) and w in CURRENCY:
            merged[-1] = CURRENCY[w] + prev
        else:
            merged.append(w)
    return " ".join(merged)


def english(text: str) -> str:
    """Whisper-style English normalisation (the rules in this module's docstring)."""
    s = text.lower()
    s = BRACKETS.sub("", s)
    s = FILLERS.sub("", s)
    s = s.replace("\u2019", "'").replace("\u2018", "'")
    s = re.sub(r"\s+'", "'", s)  # a space before an apostrophe
    for pattern, repl in REPLACERS:
        s = pattern.sub(repl, s)
    s = re.sub(r"(\d),(\d)", r"\1\2", s)
    s = re.sub(r"\.([^0-9]|$)", r" \1", s)
    s = _remove_symbols(s, keep_accents=False, keep=KEEP_SYMBOLS)
    s = _standardize_numbers(s)
    s = " ".join(SPELLINGS.get(w, w) for w in s.split())
    s = re.sub(r"[.$¢€£]([^0-9])", r" \1", s + " ")  # signs that belong to no number
    s = re.sub(r"([^0-9])%", r"\1 ", s)
    return " ".join(s.split())


def basic(text: str) -> str:
    """Any language: case folded, bracketed text removed, punctuation and symbols to spaces."""
    s = BRACKETS.sub("", text.casefold())
    s = _remove_symbols(s, keep_accents=True)
    return " ".join(s.split())


NORMALIZERS = {"english": english, "basic": basic, "none": lambda s: " ".join(s.split())}


def for_language(language: str | None) -> str:
    """The normaliser's name for a language code (en, en_us, en-GB, ...): english or basic."""
    return "english" if (language or "").lower()[:2] == "en" else "basic"
