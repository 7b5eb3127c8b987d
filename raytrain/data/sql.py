"""A procedural structured-output task: questions about a generated table -> the SQL query that answers them.

The shape of sql-create-context (WikiSQL + SPIDER), which Speculative Streaming reports on, rebuilt offline: each
example gives a `CREATE TABLE` statement (a table of one of several domains, a random subset of its columns in a
random order, sometimes a numbered name) and a question written from one of several templates (counts, lookups,
aggregates, ordering, grouping, conjunctions, with values drawn per column). The SQL is a function of the question
and the schema, so exact match is a fair metric: `{"prompt", "completion", "template"}` records, one per line.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

INSTRUCTION = "Write the SQL query that answers the question."

FIRST_NAMES = ("Alice Bruno Chen Dana Emil Farah Goran Hana Ivan Julia Kofi Lena Mateo Nora Omar Priya Quinn "
               "Rosa").split()
CITIES = "Lisbon Oslo Denver Lagos Osaka Lima Perth Quebec Tunis Riga Austin Bergen Cork Dakar Hanoi Kyoto".split()


@dataclass(frozen=True)
class Column:
    name: str
    numeric: bool
    values: tuple[str, ...] = ()  # text columns: the values questions ask about
    low: int = 0  # numeric columns: the range of thresholds
    high: int = 100


def text(name: str, values: str | list[str]) -> Column:
    return Column(name, False, tuple(values.split(",") if isinstance(values, str) else values))


def number(name: str, low: int, high: int) -> Column:
    return Column(name, True, low=low, high=high)


# domain -> (plural noun, singular noun, columns)
DOMAINS: dict[str, tuple[str, str, list[Column]]] = {
    "employees": ("employees", "employee", [
        text("name", FIRST_NAMES), text("department", "Sales,Finance,Legal,Research,Support,Marketing"),
        number("age", 20, 65), number("salary", 30000, 150000), text("city", CITIES)]),
    "products": ("products", "product", [
        text("product_name", "lamp,kettle,drill,bicycle,camera,tent,guitar,printer"),
        text("category", "garden,kitchen,sports,office,music,outdoor"), number("price", 5, 900),
        number("stock", 0, 500), text("supplier", "Acme,Globex,Initech,Umbrella,Stark,Wayne")]),
    "students": ("students", "student", [
        text("name", FIRST_NAMES), text("major", "Physics,History,Biology,Economics,Art,Mathematics"),
        number("year", 1, 4), number("credits", 0, 240), text("hometown", CITIES)]),
    "flights": ("flights", "flight", [
        text("airline", "Aurora,Boreal,Condor,Delta Wing,Eagle,Falcon"), text("origin", CITIES),
        text("destination", CITIES), number("distance", 200, 9000), number("passengers", 20, 400)]),
    "books": ("books", "book", [
        text("title", "Dune,Emma,Ulysses,Beloved,Ivanhoe,Middlemarch,Rebecca,Walden"),
        text("author", "Austen,Morrison,Joyce,Herbert,Scott,Eliot,Thoreau"),
        text("genre", "fiction,poetry,history,science,drama"), number("pages", 80, 1200), number("year", 1800, 2024)]),
    "matches": ("matches", "match", [
        text("team", "Rovers,United,Athletic,Wanderers,Rangers,City"), text("venue", CITIES),
        text("opponent", "Rovers,United,Athletic,Wanderers,Rangers,City"), number("goals", 0, 9),
        number("attendance", 1000, 90000)]),
    "hospitals": ("hospitals", "hospital", [
        text("hospital_name", "Mercy,Saint Anne,Central,Riverside,Hillcrest,Lakeview"), text("city", CITIES),
        number("beds", 20, 1500), number("doctors", 5, 600), text("region", "north,south,east,west")]),
}


@dataclass(frozen=True)
class Table:
    name: str
    plural: str
    singular: str
    columns: list[Column]

    def create(self) -> str:
        cols = ", ".join(f"{c.name} {'INTEGER' if c.numeric else 'VARCHAR'}" for c in self.columns)
        return f"CREATE TABLE {self.name} ({cols})"

    def of_kind(self, numeric: bool) -> list[Column]:
        return [c for c in self.columns if c.numeric == numeric]


def words(column: Column) -> str:
    return column.name.replace("_", " ")


def random_table(rng: random.Random) -> Table:
    domain = rng.choice(sorted(DOMAINS))
    plural, singular, columns = DOMAINS[domain]
    numeric = [c for c in columns if c.numeric]
    texts = [c for c in columns if not c.numeric]
    chosen = rng.sample(texts, rng.randint(2, len(texts))) + rng.sample(numeric, rng.randint(1, len(numeric)))
    rng.shuffle(chosen)
    name = domain if rng.random() < 0.5 else f"{domain}_{rng.randint(1, 99)}"
    return Table(name, plural, singular, chosen)


def _value(rng: random.Random, column: Column) -> str:
    return rng.choice(column.values)


def _threshold(rng: random.Random, column: Column) -> int:
    return rng.randint(column.low, column.high)


# Each template: (table, rng) -> (question, sql), or None when the table lacks the columns it needs.
Template = Callable[[Table, random.Random], "tuple[str, str] | None"]
AGGREGATES = {"average": "AVG", "highest": "MAX", "lowest": "MIN", "total": "SUM"}
COMPARISONS = {"greater than": ">", "less than": "<", "at least": ">=", "at most": "<="}


def count_equal(t: Table, rng: random.Random) -> tuple[str, str]:
    col = rng.choice(t.of_kind(False))
    v = _value(rng, col)
    return f"How many {t.plural} have {words(col)} {v}?", f"SELECT COUNT(*) FROM {t.name} WHERE {col.name} = '{v}'"


def count_compare(t: Table, rng: random.Random) -> tuple[str, str]:
    col, (phrase, op) = rng.choice(t.of_kind(True)), rng.choice(sorted(COMPARISONS.items()))
    n = _threshold(rng, col)
    return (f"How many {t.plural} have a {words(col)} {phrase} {n}?",
            f"SELECT COUNT(*) FROM {t.name} WHERE {col.name} {op} {n}")


def lookup(t: Table, rng: random.Random) -> tuple[str, str]:
    asked, known = rng.sample(t.columns, 2)
    if known.numeric:
        n = _threshold(rng, known)
        return (f"What is the {words(asked)} of the {t.singular} with {words(known)} {n}?",
                f"SELECT {asked.name} FROM {t.name} WHERE {known.name} = {n}")
    v = _value(rng, known)
    return (f"What is the {words(asked)} of the {t.singular} whose {words(known)} is {v}?",
            f"SELECT {asked.name} FROM {t.name} WHERE {known.name} = '{v}'")


def aggregate(t: Table, rng: random.Random) -> tuple[str, str]:
    num, where = rng.choice(t.of_kind(True)), rng.choice(t.of_kind(False))
    word, fn = rng.choice(sorted(AGGREGATES.items()))
    v = _value(rng, where)
    return (f"What is the {word} {words(num)} of {t.plural} with {words(where)} {v}?",
            f"SELECT {fn}({num.name}) FROM {t.name} WHERE {where.name} = '{v}'")


def top(t: Table, rng: random.Random) -> tuple[str, str]:
    shown, by = rng.choice(t.of_kind(False)), rng.choice(t.of_kind(True))
    k, (word, order) = rng.randint(1, 5), rng.choice([("highest", "DESC"), ("lowest", "ASC")])
    return (f"List the {words(shown)} of the {k} {t.plural} with the {word} {words(by)}.",
            f"SELECT {shown.name} FROM {t.name} ORDER BY {by.name} {order} LIMIT {k}")


def group_count(t: Table, rng: random.Random) -> tuple[str, str]:
    col = rng.choice(t.of_kind(False))
    return (f"How many {t.plural} are there for each {words(col)}?",
            f"SELECT {col.name}, COUNT(*) FROM {t.name} GROUP BY {col.name}")


def distinct(t: Table, rng: random.Random) -> tuple[str, str]:
    col, num = rng.choice(t.of_kind(False)), rng.choice(t.of_kind(True))
    (phrase, op), n = rng.choice(sorted(COMPARISONS.items())), _threshold(rng, num)
    return (f"List the distinct {words(col)} values of {t.plural} with a {words(num)} {phrase} {n}.",
            f"SELECT DISTINCT {col.name} FROM {t.name} WHERE {num.name} {op} {n}")


def conjunction(t: Table, rng: random.Random) -> tuple[str, str] | None:
    texts = t.of_kind(False)
    if len(texts) < 2:
        return None
    asked, known = rng.sample(texts, 2)
    num = rng.choice(t.of_kind(True))
    (phrase, op), v, n = rng.choice(sorted(COMPARISONS.items())), _value(rng, known), _threshold(rng, num)
    return (f"What is the {words(asked)} of {t.plural} whose {words(known)} is {v} and whose {words(num)} is "
            f"{phrase} {n}?", f"SELECT {asked.name} FROM {t.name} WHERE {known.name} = '{v}' AND {num.name} {op} {n}")


TEMPLATES: dict[str, Template] = {f.__name__: f for f in (count_equal, count_compare, lookup, aggregate, top,
                                                           group_count, distinct, conjunction)}


def prompt_text(table: Table, question: str) -> str:
    return f"{INSTRUCTION}\n{table.create()}\nQuestion: {question}"


def records(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[dict[str, str]]:
    """`n` examples, a pure function of `seed`, none of whose prompts is in `exclude` (a held-out set leaves out
    the training prompts)."""
    rng = random.Random(seed)
    made = 0
    while made < n:
        table, name = random_table(rng), rng.choice(sorted(TEMPLATES))
        pair = TEMPLATES[name](table, rng)
        if pair is None or (prompt := prompt_text(table, pair[0])) in exclude:
            continue
        made += 1
        yield {"prompt": prompt, "completion": pair[1], "template": name}
