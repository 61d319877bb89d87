"""Write ``support_chats.jsonl`` (360 conversations) and ``support_chats_test.jsonl`` (60).

Multi-turn chats with the support assistant of Tallowbrook, a made-up online shop for home,
kitchen and outdoor goods, in the OpenAI ``messages`` shape::

    {"messages": [{"role": "system", "content": ...}, {"role": "user", "content": ...},
                  {"role": "assistant", "content": ...}, ...]}

Every conversation has the same system prompt, 2 to 4 user turns, and ends with an assistant
turn that always ends with the same checkable sentence::

    ... I have routed order ORD-48213 to Shipping.

Both parts of it follow from the conversation by fixed rules:

* the order number is the *last* one the user gave (in some chats the first number given is
  not found and the user corrects it);
* the department follows from the user's problem: money (charges, refunds, payments,
  discounts, invoices) -> Billing; a parcel on its way (late, lost, tracking, address) ->
  Shipping; the customer wants to send an item back or exchange it -> Returns; an item, the
  website or the app does not work -> Technical. Money comes first: a refund that has not
  arrived after a return is Billing.

All text is written for this project (hand-written fragments combined with a fixed seed);
no dataset is copied. Run from anywhere; the files are written next to this script:

    python recipes/data/make_support_chats.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_FILE, TEST_FILE = HERE / "support_chats.jsonl", HERE / "support_chats_test.jsonl"
TRAIN_SEED, TEST_SEED = 14, 1014
TRAIN_ROWS, TEST_ROWS = 360, 60

SYSTEM = ("You are the support assistant of Tallowbrook, an online shop for home, kitchen and outdoor goods. "
          "Answer briefly and politely. Once you know the customer's order number and problem, route the order "
          "to one department: Billing, Shipping, Returns or Technical.")

DEPARTMENTS = ("Billing", "Shipping", "Returns", "Technical")

# Items: (name, powered). Technical problems about the item itself need a powered one.
ITEMS = [
    ("kettle", True), ("desk lamp", True), ("smart plug", True), ("bluetooth speaker", True),
    ("robot vacuum", True), ("coffee grinder", True), ("electric blanket", True), ("wireless headphones", True),
    ("stand mixer", True), ("air purifier", True), ("rain jacket", False), ("hiking boots", False),
    ("frying pan", False), ("camping tent", False), ("wool blanket", False), ("backpack", False),
    ("cutting board", False), ("garden hose", False), ("picnic set", False), ("bed sheets", False),
]

NAMES = ["Mara", "Tobin", "Ilse", "Joren", "Priya", "Kofi", "Lena", "Oskar", "Ayla", "Ruben", "Wen", "Dario",
         "Freya", "Nadim", "Sunniva", "Teo", "Halima", "Bram", "Corinne", "Elio", "Greta", "Idris", "Juno", "Maelle"]

# The user's problem, by department. {item} is filled in; "powered" problems need a powered item.
PROBLEMS: dict[str, list[tuple[str, bool]]] = {
    "Billing": [
        ("I was charged twice for the {item}.", False),
        ("My card was charged for the {item}, but the order page says the payment failed.", False),
        ("I sent the {item} back two weeks ago and the refund still has not reached my account.", False),
        ("The discount code was not applied, so I paid full price for the {item}.", False),
        ("I need an invoice with my company name for the {item}.", False),
        ("My bank statement shows more than the price of the {item}.", False),
        ("I paid for express delivery of the {item} and was charged for it twice.", False),
        ("The gift card balance was not used when I paid for the {item}.", False),
    ],
    "Shipping": [
        ("My {item} has not arrived and it is a week late.", False),
        ("The tracking page for my {item} has not changed in five days.", False),
        ("The courier says the {item} was delivered, but there is nothing at my door.", False),
        ("I need to change the delivery address for the {item} before it ships.", False),
        ("The {item} was sent to my old address.", False),
        ("The parcel came, but the {item} was not in the box.", False),
        ("The {item} is stuck at the pickup point and nobody can find it.", False),
    ],
    "Returns": [
        ("I would like to return the {item}; it is not what I expected.", False),
        ("The {item} came in the wrong colour and I want to exchange it.", False),
        ("The {item} arrived with a cracked part and I want to send it back.", False),
        ("How do I send back the {item}? I changed my mind.", False),
        ("I ordered two of the {item} by mistake and want to return one.", False),
        ("I want to swap the {item} for a different model.", False),
    ],
    "Technical": [
        ("The {item} will not turn on, even after I plugged it in overnight.", True),
        ("The {item} keeps disconnecting from the Tallowbrook app.", True),
        ("The {item} makes a buzzing noise and stops after a minute.", True),
        ("The app crashes whenever I open my order for the {item}.", False),
        ("I cannot log in to my account to see the order for the {item}.", False),
        ("The website shows an error when I try to write a review of the {item}.", False),
        ("The {item} shows a blinking red light and does nothing.", True),
    ],
}

GREETINGS = ["Hi.", "Hello.", "Hi there!", "Good morning.", "Hey,", "Hello, I need some help.", "Good evening."]
GREETING_ONLY = ["Hi, can you help me?", "Hello, is anyone there?", "Hi, I have a problem with an order.",
                 "Good morning, I need help with an order.", "Hello!"]
HOW_CAN_I_HELP = ["Hello! How can I help you today?", "Hi! What can I do for you?", "Yes, I am here. How can I help?",
                  "Of course. What seems to be the problem?"]
GIVE_ORDER = ["My order number is {order}.", "It is {order}.", "The order is {order}.", "Sure, {order}.",
              "{order}.", "It's order {order}.", "The number is {order}."]
WITH_ORDER = ["My order number is {order}.", "The order is {order}.", "It is about order {order}.",
              "Order {order}."]
ASK_ORDER = ["I am sorry to hear that. Could you give me your order number? It starts with ORD-.",
             "Sorry about that. What is your order number?",
             "I can help with that. Which order is it? The number starts with ORD-.",
             "Thank you for telling me. Could you share the order number, please?"]
NOT_FOUND = ["I cannot find order {order}. Could you check the number?",
             "There is no order {order} in our system. Could you look at the number again?",
             "Order {order} does not match any order. Please check it."]
CORRECTION = ["Sorry, my mistake. It is {order}.", "Oops, I mistyped it. The right number is {order}.",
              "You are right, it is {order}.", "Sorry, the correct one is {order}."]
CLARIFY = [  # (assistant question, user answers)
    ("When did you place the order?", ["Last Tuesday.", "About ten days ago.", "On the first of the month.",
                                       "Yesterday morning."]),
    ("Thank you. Is there anything else I should know?", ["No, that is all.", "No, please just sort it out.",
                                                          "Nothing else, thanks."]),
    ("Thanks. Did you order anything else with it?", ["No, only that.", "Yes, but the rest is fine.",
                                                      "Just that one item."]),
]
CLOSING = ["Thank you, {name}.", "Thanks for waiting, {name}.", "Sorry for the trouble, {name}.",
           "Thank you for the details.", "Thanks for your patience.", "Sorry for the trouble."]
CHECKABLE = "I have routed order {order} to {department}."

# (flow name, weight): the turns of each are built in _conversation.
FLOWS = [("ask", 20), ("clarify", 15), ("greet-ask", 15), ("fix", 10), ("clarify-twice", 15), ("greet-fix", 8),
         ("greet-ask-clarify", 17)]


def _order(rng: random.Random, used: set[str]) -> str:
    while True:
        number = f"ORD-{rng.randint(10000, 99999)}"
        if number not in used:
            used.add(number)
            return number


def _conversation(rng: random.Random, department: str, used: set[str]) -> dict:
    template, powered = rng.choice(PROBLEMS[department])
    item = rng.choice([name for name, p in ITEMS if p or not powered])
    problem = template.format(item=item)
    name = rng.choice(NAMES)
    named = rng.random() < 0.5  # the customer says their name; the last answer may use it
    intro = f"{rng.choice(GREETINGS)} This is {name}. " if named else f"{rng.choice(GREETINGS)} "
    order = _order(rng, used)
    flow = rng.choices([f for f, _ in FLOWS], weights=[w for _, w in FLOWS])[0]

    turns: list[tuple[str, str]] = []
    user = lambda text: turns.append(("user", text))  # noqa: E731
    assistant = lambda text: turns.append(("assistant", text))  # noqa: E731

    def clarify() -> None:
        question, answers = rng.choice(CLARIFY)
        assistant(question)
        user(rng.choice(answers))

    if flow.startswith("greet"):
        user(rng.choice(GREETING_ONLY))
        assistant(rng.choice(HOW_CAN_I_HELP))
        opening, named = problem, False
    else:
        opening = intro + problem
    if flow in ("clarify", "clarify-twice"):
        user(f"{opening} {rng.choice(WITH_ORDER).format(order=order)}")
        clarify()
        if flow == "clarify-twice":
            clarify()
    else:
        user(opening)
        assistant(rng.choice(ASK_ORDER))
        if flow.endswith("fix"):
            wrong = _order(rng, used)
            user(rng.choice(GIVE_ORDER).format(order=wrong))
            assistant(rng.choice(NOT_FOUND).format(order=wrong))
            user(rng.choice(CORRECTION).format(order=order))
        else:
            user(rng.choice(GIVE_ORDER).format(order=order))
        if flow == "greet-ask-clarify":
            clarify()
    closing = rng.choice([c for c in CLOSING if named or "{name}" not in c]).format(name=name)
    assistant(f"{closing} {CHECKABLE.format(order=order, department=department)}")
    messages = [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": t} for r, t in turns]
    return {"messages": messages}


def generate(seed: int, rows: int, used: set[str]) -> list[dict]:
    """``rows`` conversations, the departments balanced (``rows / 4`` each), shuffled."""
    rng = random.Random(seed)
    departments = [DEPARTMENTS[i % 4] for i in range(rows)]
    rng.shuffle(departments)
    return [_conversation(rng, d, used) for d in departments]


def check(rows: list[dict]) -> None:
    """The rules hold on every row: the last answer routes the last order number the user
    gave to one department; the user gives 2-4 turns."""
    for i, row in enumerate(rows):
        msgs = row["messages"]
        assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "assistant", i
        users = [m["content"] for m in msgs if m["role"] == "user"]
        assert 2 <= len(users) <= 4, (i, len(users))
        given = [n for text in users for n in re.findall(r"ORD-\d{5}", text)]
        routed = re.fullmatch(r".* I have routed order (ORD-\d{5}) to (\w+)\.", msgs[-1]["content"])
        assert routed and routed.group(1) == given[-1] and routed.group(2) in DEPARTMENTS, (i, msgs[-1])
        assert all("routed" not in m["content"] for m in msgs[:-1]), i


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    used: set[str] = set()  # order numbers: none is shared between the two files
    train = generate(TRAIN_SEED, TRAIN_ROWS, used)
    test = generate(TEST_SEED, TEST_ROWS, used)
    for rows in (train, test):
        check(rows)
    write(TRAIN_FILE, train)
    write(TEST_FILE, test)
    print(f"wrote {len(train)} rows to {TRAIN_FILE.name} and {len(test)} rows to {TEST_FILE.name}")


if __name__ == "__main__":
    main()
