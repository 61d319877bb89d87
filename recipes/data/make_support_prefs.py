"""Write ``support_prefs.jsonl`` (320 pairs), ``support_prefs_test.jsonl`` (80 held-out pairs)
and ``support_prefs_sft.jsonl`` (320 conversations) for preference tuning.

The world is that of ``make_support_chats.py``: the support assistant of Tallowbrook, a
made-up online shop for home, kitchen and outdoor goods. A customer writes one message with
an order number and a problem; the assistant answers once. A good answer

* is polite,
* quotes the customer's order number, and
* routes the order to the department the problem calls for: money (charges, refunds,
  payments, discounts, invoices) -> Billing; a parcel on its way (late, lost, tracking,
  address) -> Shipping; sending an item back or exchanging it -> Returns; an item, the
  website or the app does not work -> Technical.

Preference rows (``support_prefs*.jsonl``) pair a good answer (``chosen``) with one that
gets exactly one of the three wrong (``rejected``), a third of the pairs each:

``rude``        the same routing sentence between a curt or rude opening and closing;
``department``  the chosen answer with another department;
``order``       routing "your request about the <item>" without the order number.

Each row is ``{"prompt": [system, user], "chosen": "...", "rejected": "..."}``. The
rejected answer is picked, among 8 drawn, for a length (words, digits and punctuation)
closest to the chosen one's plus a small offset drawn from -3..3, so that neither answer is systematically the longer one.

The SFT file (``support_prefs_sft.jsonl``) has prompts of the same kind with the good answer
as the assistant's message (OpenAI ``messages`` rows), for a supervised stage before DPO.

The test file measures generalisation: another seed, and it also draws on items, problem
wordings, openings, closings and routing sentences that neither training file uses
(``HELD_OUT``). No order number appears in two files.

All text is written for this project (hand-written fragments combined with fixed seeds); no
dataset is copied. Run from anywhere; the files are written next to this script:

    python recipes/data/make_support_prefs.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_FILE, TEST_FILE, SFT_FILE = (HERE / "support_prefs.jsonl", HERE / "support_prefs_test.jsonl",
                                   HERE / "support_prefs_sft.jsonl")
TRAIN_SEED, TEST_SEED, SFT_SEED = 16, 1016, 2016
TRAIN_ROWS, TEST_ROWS, SFT_ROWS = 320, 80, 320

SYSTEM = ("You are the support assistant of Tallowbrook, an online shop for home, kitchen and outdoor goods. "
          "Answer politely, quote the customer's order number and route the order to one department: "
          "Billing, Shipping, Returns or Technical.")

DEPARTMENTS = ("Billing", "Shipping", "Returns", "Technical")
FLAWS = ("rude", "department", "order")

# Fragments: (text, held_out). Held-out ones appear only in the test file.
# Items: (name, powered, held_out). Technical problems about the item itself need a powered one.
ITEMS = [
    ("kettle", True, False), ("desk lamp", True, False), ("smart plug", True, False),
    ("bluetooth speaker", True, False), ("robot vacuum", True, False), ("coffee grinder", True, False),
    ("electric blanket", True, False), ("toaster", True, False), ("rain jacket", False, False),
    ("hiking boots", False, False), ("frying pan", False, False), ("camping tent", False, False),
    ("wool blanket", False, False), ("backpack", False, False), ("cutting board", False, False),
    ("garden hose", False, False), ("bed sheets", False, False), ("teapot", False, False),
    # held out
    ("air purifier", True, True), ("hand blender", True, True), ("sleeping bag", False, True),
    ("watering can", False, True), ("table lamp", True, True), ("picnic blanket", False, True),
]

NAMES = ["Mara", "Tobin", "Ilse", "Joren", "Priya", "Kofi", "Lena", "Oskar", "Ayla", "Ruben", "Wen", "Dario",
         "Freya", "Nadim", "Sunniva", "Teo", "Halima", "Bram", "Corinne", "Elio", "Greta", "Idris", "Juno", "Maelle"]

# The customer's problem, by department: (wording, needs a powered item, held out).
PROBLEMS: dict[str, list[tuple[str, bool, bool]]] = {
    "Billing": [
        ("I was charged twice for the {item}.", False, False),
        ("My card was charged for the {item}, but the order page says the payment failed.", False, False),
        ("I returned the {item} two weeks ago and the refund has still not reached my account.", False, False),
        ("The discount code did not work, so I paid full price for the {item}.", False, False),
        ("I need an invoice with my company name for the {item}.", False, False),
        ("My bank statement shows more than the price of the {item}.", False, False),
        ("The gift card balance was not used when I paid for the {item}.", False, False),
        ("I was billed for express delivery of the {item}, but I chose the free option.", False, True),
        ("The receipt for the {item} shows the wrong amount of tax.", False, True),
    ],
    "Shipping": [
        ("My {item} has not arrived and it is a week late.", False, False),
        ("The tracking page for my {item} has not changed in five days.", False, False),
        ("The courier says the {item} was delivered, but there is nothing at my door.", False, False),
        ("I need to change the delivery address for the {item} before it ships.", False, False),
        ("The {item} was sent to my old address.", False, False),
        ("The parcel came, but the {item} was not in the box.", False, False),
        ("The {item} is stuck at the pickup point and nobody can find it.", False, False),
        ("The delivery of the {item} was promised for Monday and it is now Friday.", False, True),
        ("The courier left the {item} with a neighbour I do not know.", False, True),
    ],
    "Returns": [
        ("I would like to return the {item}; it is not what I expected.", False, False),
        ("The {item} came in the wrong colour and I want to exchange it.", False, False),
        ("The {item} arrived with a cracked part and I want to send it back.", False, False),
        ("How do I send back the {item}? I changed my mind.", False, False),
        ("I ordered the {item} twice by mistake and want to return one.", False, False),
        ("I want to swap the {item} for a different model.", False, False),
        ("The {item} is too small for us, so I would like to send it back.", False, False),
        ("The {item} was a gift we do not need; can I return it for store credit?", False, True),
        ("I would like to exchange the {item} for the larger size.", False, True),
    ],
    "Technical": [
        ("The {item} will not turn on, even after I plugged it in overnight.", True, False),
        ("The {item} keeps disconnecting from the Tallowbrook app.", True, False),
        ("The {item} makes a buzzing noise and stops after a minute.", True, False),
        ("The app crashes whenever I open my order for the {item}.", False, False),
        ("I cannot log in to my account to see the order for the {item}.", False, False),
        ("The website shows an error when I try to write a review of the {item}.", False, False),
        ("The {item} shows a blinking red light and does nothing.", True, False),
        ("The {item} switches itself off every few minutes.", True, True),
        ("The order page for the {item} stays blank in every browser I try.", False, True),
    ],
}

GREETINGS = [("Hi.", False), ("Hello.", False), ("Hi there!", False), ("Good morning.", False), ("Hey,", False),
             ("Hello, I need some help.", False), ("Good evening.", False), ("Hi, quick question.", True),
             ("Hello again.", True)]
ORDER_FIRST = [("Order {order}:", False), ("About order {order}:", False), ("My order is {order}.", False),
               ("Regarding order {order}:", True)]
ORDER_LAST = [("My order number is {order}.", False), ("The order is {order}.", False), ("It is order {order}.", False),
              ("Order number: {order}.", False), ("The order number is {order}, if that helps.", True)]

# The good answer: opening, routing sentence, closing.
OPENINGS = [
    ("Thank you for letting us know, {name}.", False), ("I am sorry to hear that, {name}.", False),
    ("Thanks for writing to us, and sorry for the trouble.", False), ("I am sorry about the trouble with the {item}.", False),
    ("Thank you for your patience.", False), ("Sorry for the inconvenience, {name}.", False),
    ("Thank you for the details.", False), ("I understand, and I am sorry this happened.", False),
    ("Thank you for reaching out, {name}.", True), ("I am sorry the {item} has caused you trouble.", True),
]
ROUTINGS = [  # with the order number
    ("I have routed order {order} to {department}.", False), ("I have passed order {order} to our {department} team.", False),
    ("Order {order} is now with our {department} team.", False), ("I have sent order {order} to {department}.", False),
    ("I have forwarded order {order} to our {department} colleagues.", True),
]
ROUTINGS_WITHOUT_ORDER = [  # the "order" flaw: the same sentences about the item, the number left out
    ("I have routed your request about the {item} to {department}.", False),
    ("I have passed your message about the {item} to our {department} team.", False),
    ("Your request about the {item} is now with our {department} team.", False),
    ("I have sent your message about the {item} to {department}.", False),
    ("I have forwarded your request about the {item} to our {department} colleagues.", True),
]
CLOSINGS = [
    ("They will reply within one working day.", False), ("You will hear from them by email soon.", False),
    ("They will be in touch shortly.", False), ("Please let me know if there is anything else I can do.", False),
    ("They will contact you by email within a day.", False), ("Thank you for shopping with Tallowbrook.", False),
    ("Someone will write to you within a day.", True), ("We will sort this out as quickly as we can.", True),
]
# The "rude" flaw: curt or rude opening and closing around a correct routing sentence.
RUDE_OPENINGS = [
    ("That is not really my problem.", False), ("You should have read the order page first.", False),
    ("Fine, {name}.", False), ("People never check before they write.", False), ("Well, that is hardly our fault.", False),
    ("Not this again.", False), ("Honestly, this could have waited.", False), ("Whatever, {name}.", False),
    ("Do you ever read the instructions?", True), ("Calm down, it is only a {item}.", True),
]
RUDE_CLOSINGS = [
    ("Do not write to us again about it.", False), ("Wait like everyone else.", False), ("That is all I can do.", False),
    ("Stop sending messages.", False), ("They will get to it when they get to it.", False),
    ("Next time, figure it out yourself.", False), ("Do not expect a quick answer.", False),
    ("And do not bother me with it again.", True), ("That is the end of it.", True),
]


def _pick(rng: random.Random, fragments: list[tuple], held_out: bool) -> str:
    """A fragment's text: training files draw from the shared ones only; the test file draws
    a held-out one half the time (when the list has one)."""
    shared = [f[0] for f in fragments if not f[-1]]
    extra = [f[0] for f in fragments if f[-1]]
    if held_out and extra and rng.random() < 0.5:
        return rng.choice(extra)
    return rng.choice(shared)


def _order(rng: random.Random, used: set[str]) -> str:
    while True:
        number = f"ORD-{rng.randint(10000, 99999)}"
        if number not in used:
            used.add(number)
            return number


def _prompt(rng: random.Random, department: str, used: set[str], held_out: bool) -> tuple[list[dict], dict]:
    """The system and user messages, and what an answer needs (order, department, name, item)."""
    wording, powered, problem_held_out = rng.choice([p for p in PROBLEMS[department] if held_out or not p[2]])
    items = [name for name, p, h in ITEMS if (p or not powered) and (held_out or not h)]
    if held_out:  # the held-out items come up about half the time
        novel = [name for name, p, h in ITEMS if (p or not powered) and h]
        item = rng.choice(novel if rng.random() < 0.5 else items)
    else:
        item = rng.choice(items)
    order = _order(rng, used)
    named = rng.random() < 0.5
    name = rng.choice(NAMES)
    greeting = _pick(rng, GREETINGS, held_out)
    intro = f"{greeting} This is {name}." if named else greeting
    problem = wording.format(item=item)
    if rng.random() < 0.4:
        text = f"{intro} {_pick(rng, ORDER_FIRST, held_out).format(order=order)} {problem}"
    else:
        text = f"{intro} {problem} {_pick(rng, ORDER_LAST, held_out).format(order=order)}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return messages, {"order": order, "department": department, "name": name if named else None, "item": item}


def _fill(rng: random.Random, fragments: list[tuple], held_out: bool, facts: dict) -> str:
    """A fragment filled in; one that needs the customer's name is drawn only when they gave it."""
    usable = [f for f in fragments if facts["name"] or "{name}" not in f[0]]
    return _pick(rng, usable, held_out).format(**facts)


def _good_answer(rng: random.Random, facts: dict, held_out: bool) -> tuple[str, str, str]:
    return (_fill(rng, OPENINGS, held_out, facts), _fill(rng, ROUTINGS, held_out, facts),
            _fill(rng, CLOSINGS, held_out, facts))


def _bad_answer(rng: random.Random, flaw: str, facts: dict, good: tuple[str, str, str], held_out: bool) -> str:
    opening, routing, closing = good
    if flaw == "rude":
        return " ".join((_fill(rng, RUDE_OPENINGS, held_out, facts), routing, _fill(rng, RUDE_CLOSINGS, held_out, facts)))
    if flaw == "department":
        wrong = rng.choice([d for d in DEPARTMENTS if d != facts["department"]])
        return " ".join((opening, routing.replace(facts["department"], wrong), closing))
    opening, closing = _fill(rng, OPENINGS, held_out, facts), _fill(rng, CLOSINGS, held_out, facts)
    return " ".join((opening, _fill(rng, ROUTINGS_WITHOUT_ORDER, held_out, facts), closing))


def _length(text: str) -> int:
    """About the number of tokens: words, digits and punctuation marks (``ORD`` counts two)."""
    return len(re.findall(r"\d|[^\W\d]+|[^\w\s]", text)) + text.count("ORD-")


def _pair(rng: random.Random, department: str, flaw: str, used: set[str], held_out: bool) -> dict:
    prompt, facts = _prompt(rng, department, used, held_out)
    # Draw a few answers and keep the pair whose length difference is closest to a target
    # drawn around zero: either answer may be the longer one, by about as much.
    target = rng.randint(-3, 3)
    best = None
    for _ in range(8):
        good = _good_answer(rng, facts, held_out)
        chosen = " ".join(good)
        rejected = _bad_answer(rng, flaw, facts, good, held_out)
        miss = abs(_length(chosen) - _length(rejected) - target)
        if best is None or miss < best[0]:
            best = (miss, chosen, rejected)
    return {"prompt": prompt, "chosen": best[1], "rejected": best[2]}


def _plan(rng: random.Random, rows: int) -> list[tuple[str, str]]:
    """(department, flaw) per row: departments balanced, flaws balanced within each, shuffled."""
    plan = [(DEPARTMENTS[i % 4], FLAWS[(i // 4) % 3]) for i in range(rows)]
    rng.shuffle(plan)
    return plan


def generate_pairs(seed: int, rows: int, used: set[str], *, held_out: bool) -> list[dict]:
    rng = random.Random(seed)
    return [_pair(rng, d, flaw, used, held_out) for d, flaw in _plan(rng, rows)]


def generate_sft(seed: int, rows: int, used: set[str]) -> list[dict]:
    """Prompts of the same kind with the good answer as the assistant's message."""
    rng = random.Random(seed)
    out = []
    for department, _ in _plan(rng, rows):
        prompt, facts = _prompt(rng, department, used, held_out=False)
        out.append({"messages": [*prompt, {"role": "assistant", "content": " ".join(_good_answer(rng, facts, False))}]})
    return out


# -- checks -----------------------------------------------------------------------------------

def department_of(text: str) -> str:
    """The department a user message's problem calls for (from the fragment it was made of)."""
    found = {department for department, problems in PROBLEMS.items() for wording, _, _ in problems
             if all(part in text for part in wording.split("{item}"))}
    if len(found) != 1:
        raise ValueError(f"{len(found)} departments' problems in {text!r}")
    return found.pop()


def judge(prompt: list[dict], answer: str) -> set[str]:
    """What is wrong with ``answer`` (a subset of ``FLAWS``): empty for a good answer."""
    user = prompt[-1]["content"]
    order = re.search(r"ORD-\d{5}", user).group(0)
    flaws = set()
    if any(text.split("{")[0].strip(" ,.") in answer for text, _ in RUDE_OPENINGS + RUDE_CLOSINGS):
        flaws.add("rude")
    named = [d for d in DEPARTMENTS if re.search(rf"\b{d}\b", answer)]
    if named != [department_of(user)]:
        flaws.add("department")
    if order not in answer:
        flaws.add("order")
    return flaws


def check_pairs(rows: list[dict]) -> None:
    """Every chosen answer is good, every rejected one has exactly one flaw; the flaws and
    the departments are balanced."""
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "chosen", "rejected"}, i
        assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["prompt"][0]["content"] == SYSTEM, i
        assert judge(row["prompt"], row["chosen"]) == set(), (i, row["chosen"])
        assert len(judge(row["prompt"], row["rejected"])) == 1, (i, row["rejected"])


def check_sft(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[0]["content"] == SYSTEM, i
        assert judge(msgs[:2], msgs[2]["content"]) == set(), (i, msgs[2])


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    used: set[str] = set()  # order numbers: none is shared between the files
    train = generate_pairs(TRAIN_SEED, TRAIN_ROWS, used, held_out=False)
    test = generate_pairs(TEST_SEED, TEST_ROWS, used, held_out=True)
    sft = generate_sft(SFT_SEED, SFT_ROWS, used)
    for rows in (train, test):
        check_pairs(rows)
    check_sft(sft)
    write(TRAIN_FILE, train)
    write(TEST_FILE, test)
    write(SFT_FILE, sft)
    print(f"wrote {len(train)} pairs to {TRAIN_FILE.name}, {len(test)} to {TEST_FILE.name} and "
          f"{len(sft)} conversations to {SFT_FILE.name}")


if __name__ == "__main__":
    main()
