"""Structured extraction: fields constrained by `regex` (and the whole object by `json_schema`),
so the output parses. Constrained decoding happens in the server's grammar backend."""

import json

from common import setup

import plait as sgl
from plait.lang.ir import REGEX_INT, REGEX_STR

TEXT = ("Marie Curie was born in Warsaw in 1867. She moved to Paris to study physics and became the "
        "first person to win two Nobel Prizes.")

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "birth_year": {"type": "integer"},
                         "city": {"type": "string"}, "nobel_prizes": {"type": "integer"}},
          "required": ["name", "birth_year", "city", "nobel_prizes"]}


@sgl.function
def extract_by_fields(s, text):
    s += "Extract facts from the text as JSON.\nText: " + text + "\n"
    with s.var_scope("json"):
        s += "{\n"
        s += '  "name": ' + sgl.gen("name", regex=REGEX_STR, max_tokens=16) + ",\n"
        s += '  "birth_year": ' + sgl.gen("birth_year", regex=r"[0-9]{4}", max_tokens=4) + ",\n"
        s += '  "city": ' + sgl.gen("city", regex=REGEX_STR, max_tokens=16) + ",\n"
        s += '  "nobel_prizes": ' + sgl.gen("nobel_prizes", regex=REGEX_INT, stop=[" ", "\n"], max_tokens=4) + "\n"
        s += "}"


@sgl.function
def extract_by_schema(s, text):
    s += sgl.user("Extract name, birth_year, city and nobel_prizes as JSON from: " + text)
    s += sgl.assistant(sgl.gen("json", json_schema=json.dumps(SCHEMA), max_tokens=96))


def try_parse(text: str) -> str:
    try:
        return json.dumps(json.loads(text))
    except json.JSONDecodeError:
        return f"(not JSON: the server may not enforce constraints yet) {text!r}"


if __name__ == "__main__":
    setup(__doc__)
    print("regex fields:", try_parse(extract_by_fields.run(text=TEXT, temperature=0)["json"]))
    print("json schema: ", try_parse(extract_by_schema.run(text=TEXT, temperature=0)["json"]))
