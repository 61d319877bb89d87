"""Write ``translations.jsonl`` (400 rows) and ``translations_test.jsonl`` (60 rows).

English -> Spanish translation of short sentences as instruction data (the Alpaca shape)::

    {"instruction": "Translate the sentence into Spanish.", "input": "My sister reads the old books.",
     "output": "Mi hermana lee los libros viejos."}

The sentences come from a small bilingual phrase grammar written for this project: a subject,
a verb conjugated for it in both languages (English third person -s, "does not", "Does ...?";
Spanish present-tense endings), an object with a determiner and an optional adjective that
agree with the noun's gender and number in Spanish and come after it, and an optional time
phrase; affirmative, negative and yes/no questions. Spanish is that of Spain (``tú``,
``zumo``, ``coche``); subject pronouns are kept. Combined with a fixed seed; the test rows
share no English sentence with the training rows. Run from anywhere; the files are written
next to this script:

    python recipes/data/make_translations.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_FILE, TEST_FILE = HERE / "translations.jsonl", HERE / "translations_test.jsonl"
TRAIN_SEED, TEST_SEED = 7, 1007
TRAIN_ROWS, TEST_ROWS = 400, 60

INSTRUCTIONS = ["Translate the sentence into Spanish.", "Translate this English sentence into Spanish.",
                "Give the Spanish translation of the sentence."]

PERSONS = ("1s", "2s", "3s", "1p", "3p")

# (English, Spanish, person)
SUBJECTS = [
    ("I", "Yo", "1s"), ("you", "Tú", "2s"), ("he", "Él", "3s"), ("she", "Ella", "3s"), ("we", "Nosotros", "1p"),
    ("they", "Ellos", "3p"), ("my brother", "Mi hermano", "3s"), ("my sister", "Mi hermana", "3s"),
    ("my father", "Mi padre", "3s"), ("my mother", "Mi madre", "3s"), ("the children", "Los niños", "3p"),
    ("my friends", "Mis amigos", "3p"), ("the neighbours", "Los vecinos", "3p"), ("Ana", "Ana", "3s"),
    ("Marco", "Marco", "3s"), ("Luis and I", "Luis y yo", "1p"), ("Sara and Pablo", "Sara y Pablo", "3p"),
]

# English base and third-person forms; the Spanish forms for 1s 2s 3s 1p 3p; the object kinds.
VERBS = [
    ("eat", "eats", "como comes come comemos comen", {"food"}),
    ("buy", "buys", "compro compras compra compramos compran", {"food", "thing", "drink"}),
    ("cook", "cooks", "cocino cocinas cocina cocinamos cocinan", {"cookable"}),
    ("drink", "drinks", "bebo bebes bebe bebemos beben", {"drink"}),
    ("read", "reads", "leo lees lee leemos leen", {"reading"}),
    ("write", "writes", "escribo escribes escribe escribimos escriben", {"writing"}),
    ("want", "wants", "quiero quieres quiere queremos quieren", {"food", "drink", "thing", "pet"}),
    ("have", "has", "tengo tienes tiene tenemos tienen", {"thing", "pet"}),
    ("need", "needs", "necesito necesitas necesita necesitamos necesitan", {"thing"}),
    ("open", "opens", "abro abres abre abrimos abren", {"openable"}),
    ("clean", "cleans", "limpio limpias limpia limpiamos limpian", {"cleanable"}),
    ("wash", "washes", "lavo lavas lava lavamos lavan", {"washable"}),
    ("paint", "paints", "pinto pintas pinta pintamos pintan", {"paintable"}),
    ("sell", "sells", "vendo vendes vende vendemos venden", {"food", "thing"}),
    ("carry", "carries", "llevo llevas lleva llevamos llevan", {"carryable"}),
    ("watch", "watches", "veo ves ve vemos ven", {"show"}),
]

# English singular and plural (None: a mass noun), Spanish singular and plural, gender,
# object kinds, adjective groups.
NOUNS = [
    ("apple", "apples", "manzana", "manzanas", "f", {"food"}, {"colour3", "fresh"}),
    ("orange", "oranges", "naranja", "naranjas", "f", {"food"}, {"fresh"}),
    ("sandwich", "sandwiches", "bocadillo", "bocadillos", "m", {"food"}, {"size"}),
    ("cake", "cakes", "pastel", "pasteles", "m", {"food"}, {"size"}),
    ("egg", "eggs", "huevo", "huevos", "m", {"food", "cookable"}, {"fresh"}),
    ("tomato", "tomatoes", "tomate", "tomates", "m", {"food"}, {"fresh", "colour3"}),
    ("potato", "potatoes", "patata", "patatas", "f", {"food", "cookable"}, {"size"}),
    ("bread", None, "pan", None, "m", {"food"}, {"fresh"}),
    ("rice", None, "arroz", None, "m", {"food", "cookable"}, set()),
    ("soup", None, "sopa", None, "f", {"food", "cookable"}, {"temperature"}),
    ("fish", None, "pescado", None, "m", {"food", "cookable"}, {"fresh"}),
    ("cheese", None, "queso", None, "m", {"food"}, {"fresh"}),
    ("coffee", None, "café", None, "m", {"drink"}, {"temperature"}),
    ("tea", None, "té", None, "m", {"drink"}, {"temperature"}),
    ("milk", None, "leche", None, "f", {"drink"}, {"temperature"}),
    ("juice", None, "zumo", None, "m", {"drink"}, {"temperature"}),
    ("book", "books", "libro", "libros", "m", {"thing", "reading", "openable", "carryable"}, {"colour", "age", "size"}),
    ("newspaper", "newspapers", "periódico", "periódicos", "m", {"reading", "carryable"}, {"age"}),
    ("magazine", "magazines", "revista", "revistas", "f", {"reading", "thing"}, {"age"}),
    ("letter", "letters", "carta", "cartas", "f", {"reading", "writing", "openable"}, {"length"}),
    ("story", "stories", "historia", "historias", "f", {"reading", "writing"}, {"length"}),
    ("poem", "poems", "poema", "poemas", "m", {"reading", "writing"}, {"length"}),
    ("email", "emails", "correo", "correos", "m", {"writing", "reading"}, {"length"}),
    ("bag", "bags", "bolsa", "bolsas", "f", {"thing", "carryable", "openable"}, {"colour", "size", "age"}),
    ("box", "boxes", "caja", "cajas", "f", {"thing", "carryable", "openable", "paintable"}, {"colour", "size"}),
    ("chair", "chairs", "silla", "sillas", "f", {"thing", "paintable", "cleanable", "carryable"}, {"colour", "age"}),
    ("table", "tables", "mesa", "mesas", "f", {"thing", "paintable", "cleanable"}, {"colour", "age", "size"}),
    ("lamp", "lamps", "lámpara", "lámparas", "f", {"thing", "carryable"}, {"colour", "age"}),
    ("bicycle", "bicycles", "bicicleta", "bicicletas", "f", {"thing", "cleanable", "washable", "paintable"},
     {"colour", "age"}),
    ("car", "cars", "coche", "coches", "m", {"thing", "cleanable", "washable"}, {"colour", "age", "size"}),
    ("shirt", "shirts", "camisa", "camisas", "f", {"thing", "washable"}, {"colour", "age"}),
    ("hat", "hats", "sombrero", "sombreros", "m", {"thing", "carryable"}, {"colour", "age", "size"}),
    ("umbrella", "umbrellas", "paraguas", "paraguas", "m", {"thing", "carryable", "openable"}, {"colour", "age"}),
    ("key", "keys", "llave", "llaves", "f", {"thing", "carryable"}, {"age", "size"}),
    ("phone", "phones", "teléfono", "teléfonos", "m", {"thing"}, {"colour", "age"}),
    ("cup", "cups", "taza", "tazas", "f", {"thing", "washable"}, {"colour", "size"}),
    ("plate", "plates", "plato", "platos", "m", {"thing", "washable"}, {"colour", "size"}),
    ("door", "doors", "puerta", "puertas", "f", {"openable", "paintable"}, {"colour", "age"}),
    ("window", "windows", "ventana", "ventanas", "f", {"openable", "cleanable"}, {"size"}),
    ("kitchen", "kitchens", "cocina", "cocinas", "f", {"cleanable", "paintable"}, {"size", "age"}),
    ("room", "rooms", "habitación", "habitaciones", "f", {"cleanable", "paintable"}, {"size"}),
    ("house", "houses", "casa", "casas", "f", {"paintable"}, {"colour", "age", "size"}),
    ("fence", "fences", "valla", "vallas", "f", {"paintable"}, {"colour", "age"}),
    ("wall", "walls", "pared", "paredes", "f", {"paintable", "cleanable"}, {"colour"}),
    ("dog", "dogs", "perro", "perros", "m", {"pet"}, {"size", "colour3"}),
    ("cat", "cats", "gato", "gatos", "m", {"pet"}, {"size", "colour3"}),
    ("bird", "birds", "pájaro", "pájaros", "m", {"pet"}, {"size"}),
    ("film", "films", "película", "películas", "f", {"show"}, {"age", "length"}),
    ("match", "matches", "partido", "partidos", "m", {"show"}, {"length"}),
]

# English; Spanish masculine singular, feminine singular, masculine plural, feminine plural; group.
ADJECTIVES = [
    ("red", "rojo roja rojos rojas", "colour"), ("blue", "azul azul azules azules", "colour"),
    ("green", "verde verde verdes verdes", "colour"), ("white", "blanco blanca blancos blancas", "colour"),
    ("black", "negro negra negros negras", "colour"), ("yellow", "amarillo amarilla amarillos amarillas", "colour"),
    ("new", "nuevo nueva nuevos nuevas", "age"), ("old", "viejo vieja viejos viejas", "age"),
    ("small", "pequeño pequeña pequeños pequeñas", "size"), ("big", "grande grande grandes grandes", "size"),
    ("fresh", "fresco fresca frescos frescas", "fresh"), ("hot", "caliente caliente calientes calientes", "temperature"),
    ("cold", "frío fría fríos frías", "temperature"), ("long", "largo larga largos largas", "length"),
    ("short", "corto corta cortos cortas", "length"),
]
# "colour3": the few colours that suit fruit, vegetables and animals
COLOUR3 = {"red", "green", "yellow", "white", "black"}

# Determiners: English; Spanish by gender (m, f); number (sg, pl, or none); whether it goes
# with a mass noun ("the bread", "my coffee", bare "coffee"; not "a bread", "two breads").
DETERMINERS = [
    ("a", ("un", "una"), "sg", False), ("the", ("el", "la"), "sg", True), ("the", ("los", "las"), "pl", False),
    ("my", ("mi", "mi"), "sg", True), ("my", ("mis", "mis"), "pl", False),
    ("your", ("tu", "tu"), "sg", True), ("your", ("tus", "tus"), "pl", False),
    ("our", ("nuestro", "nuestra"), "sg", True), ("our", ("nuestros", "nuestras"), "pl", False),
    ("this", ("este", "esta"), "sg", True), ("these", ("estos", "estas"), "pl", False),
    ("two", ("dos", "dos"), "pl", False), ("three", ("tres", "tres"), "pl", False),
    ("", ("", ""), "mass", True),  # no article: "She drinks coffee." / "Ella bebe café."
]

TIMES = [("every day", "todos los días"), ("today", "hoy"), ("in the morning", "por la mañana"),
         ("at night", "por la noche"), ("on Sundays", "los domingos"), ("every week", "cada semana"),
         ("now", "ahora"), ("often", "a menudo")]


def _adjective_fits(adjective: tuple[str, str, str], groups: set[str]) -> bool:
    en, _, group = adjective
    return group in groups or (group == "colour" and "colour3" in groups and en in COLOUR3)


def _object(rng: random.Random, kinds: set[str], negative: bool) -> tuple[str, str]:
    en_sg, en_pl, es_sg, es_pl, gender, _, groups = rng.choice([n for n in NOUNS if n[5] & kinds])
    mass = en_pl is None
    choices = [d for d in DETERMINERS if (d[3] if mass else d[2] != "mass")
               and not (negative and d[0] == "a")]  # "no tiene un perro" reads oddly: no "a" in negatives
    en_det, es_det, number, _ = rng.choice(choices)
    plural = number == "pl"
    en_noun, es_noun = (en_pl, es_pl) if plural else (en_sg, es_sg)
    es_det = es_det[gender == "f"]
    adjectives = [a for a in ADJECTIVES if _adjective_fits(a, groups)]
    en_adj = es_adj = ""
    if adjectives and rng.random() < 0.45:
        en_adj, forms, _ = rng.choice(adjectives)
        es_adj = forms.split()[(2 if plural else 0) + (gender == "f")]
    if en_det == "a" and (en_adj or en_noun)[0] in "aeiou":
        en_det = "an"
    en = " ".join(w for w in (en_det, en_adj, en_noun) if w)
    es = " ".join(w for w in (es_det, es_noun, es_adj) if w)
    return en, es


def sentence(rng: random.Random) -> tuple[str, str]:
    """One (English, Spanish) pair."""
    en_subj, es_subj, person = rng.choice(SUBJECTS)
    base, third, forms, kinds = rng.choice(VERBS)
    es_verb = forms.split()[PERSONS.index(person)]
    mood = rng.choices(["affirmative", "negative", "question"], weights=[6, 2, 2])[0]
    en_obj, es_obj = _object(rng, kinds, negative=mood == "negative")
    en_time = es_time = ""
    if rng.random() < 0.4:
        en_time, es_time = rng.choice(TIMES)
    third_person = person == "3s"
    if mood == "affirmative":
        en = f"{en_subj} {third if third_person else base} {en_obj}"
        es = f"{es_subj} {es_verb} {es_obj}"
    elif mood == "negative":
        en = f"{en_subj} {'does' if third_person else 'do'} not {base} {en_obj}"
        es = f"{es_subj} no {es_verb} {es_obj}"
    else:
        en = f"{'Does' if third_person else 'Do'} {en_subj} {base} {en_obj}"
        es = f"{es_subj} {es_verb} {es_obj}"
    if en_time:
        en, es = f"{en} {en_time}", f"{es} {es_time}"
    en = en[0].upper() + en[1:]
    if mood == "question":
        return en + "?", "¿" + es + "?"
    return en + ".", es + "."


def generate(seed: int, rows: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``rows`` distinct sentences, none of them in ``exclude`` (English)."""
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < rows:
        en, es = sentence(rng)
        if en in seen:
            continue
        seen.add(en)
        out.append({"instruction": rng.choice(INSTRUCTIONS), "input": en, "output": es})
    return out


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train = generate(TRAIN_SEED, TRAIN_ROWS)
    test = generate(TEST_SEED, TEST_ROWS, exclude={row["input"] for row in train})
    write(TRAIN_FILE, train)
    write(TEST_FILE, test)
    print(f"wrote {len(train)} rows to {TRAIN_FILE.name} and {len(test)} rows to {TEST_FILE.name}")


if __name__ == "__main__":
    main()
