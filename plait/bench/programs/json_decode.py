"""JSON decoding with regular expressions: read a long document, then fill in a JSON object one
constrained field at a time, the punctuation between fields written by the program.

The pattern: `gen(regex=...)` makes the runtime decode only text the regex accepts (a token mask
per step); where the regex allows a single continuation (a closing quote, `", "` between list
items) the runtime appends it without decoding token by token (jump-forward, the compressed FSM).

    @sgl.function
    def city_facts(s, document):
        s += "Please extract the information of a city from the following page.\\n" + document
        s += "{\\n"
        s += '  "name": ' + sgl.gen("name", max_tokens=24, regex=REGEX_NAME) + ",\\n"
        ...
        s += '  "top 3 landmarks": ' + sgl.gen("landmarks", max_tokens=64, regex=REGEX_LANDMARKS) + "\\n}"
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import plait as sgl
from plait.bench.programs.text import between, name, rng_for
from plait.bench.programs.workload import Structure, Workload

REGEX_NAME = r'"[\w ]{1,16}"'
REGEX_LATITUDE = r"-?[0-9]{1,2}\.[0-9]{1,4}"
REGEX_POPULATION = r"[1-9][0-9]{0,8}"
REGEX_LANDMARKS = r'\["[\w ]{1,16}", "[\w ]{1,16}", "[\w ]{1,16}"\]'
FIELDS = (("name", REGEX_NAME, 24), ("country", REGEX_NAME, 24), ("latitude", REGEX_LATITUDE, 12),
          ("population", REGEX_POPULATION, 12), ("top 3 landmarks", REGEX_LANDMARKS, 64))


@dataclass(frozen=True)
class Shape:
    documents: int
    document_tokens: tuple[int, int]
    latency_programs: int


SHAPES = {
    # The paper: Wikipedia city pages cut to about 3,000 tokens, 5 constrained fields.
    "paper": Shape(documents=64, document_tokens=(2800, 3000), latency_programs=8),
    "cpu": Shape(documents=24, document_tokens=(500, 700), latency_programs=4),
    "quick": Shape(documents=2, document_tokens=(30, 40), latency_programs=1),
}


@sgl.function
def city_facts(s, document):
    s += "Please extract the information of a city from the following page.\n"
    s += "Page begin.\n" + document + "\nPage end.\n"
    s += "Here is the name, country, latitude, population and top 3 landmarks of the city in JSON format.\n"
    s += "{\n"
    for i, (field, regex, max_tokens) in enumerate(FIELDS):
        s += f'  "{field}": ' + sgl.gen(field, max_tokens=max_tokens, regex=regex)
        s += ",\n" if i + 1 < len(FIELDS) else "\n"
    s += "}\n"


def is_valid(state) -> bool:
    """Whether the fields make a JSON object of the right types (max_tokens can cut a field short)."""
    try:
        obj = json.loads("{" + ", ".join(f'"{field}": {state[field]}' for field, _, _ in FIELDS) + "}")
    except ValueError:
        return False
    return (isinstance(obj["name"], str) and isinstance(obj["latitude"], float) and isinstance(obj["population"], int)
            and isinstance(obj["top 3 landmarks"], list) and len(obj["top 3 landmarks"]) == 3)


def make_args(shape: Shape, seed: int) -> list[dict]:
    args = []
    for d in range(shape.documents):
        rng = rng_for(seed, "json", d)
        city, country = name(rng), name(rng)
        body = between(rng, *shape.document_tokens)
        args.append({"document": f"{city} is a city in {country}. {body} The population of {city} is "
                                 f"{rng.randint(10_000, 9_000_000)}."})
    return args


WORKLOAD = Workload(
    name="json_decode", title="JSON (regex)", program=city_facts, shapes=SHAPES, make_args=make_args,
    structure=lambda shape, args: Structure(gens=len(FIELDS)),
    validate=is_valid,
)
