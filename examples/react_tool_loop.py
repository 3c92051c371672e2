"""A ReAct-style tool loop: the model thinks, picks an action with `select`, the program runs the
tool in Python and appends the observation; reading `s[...]` inside the program is what lets
control flow depend on the model's choices."""

import ast
import operator

from common import setup

import plait as sgl

FACTS = {"eiffel tower": "The Eiffel Tower is 330 metres tall.",
         "statue of liberty": "The Statue of Liberty is 93 metres tall including its pedestal."}


def calculator(expression: str) -> str:
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("unsupported expression")

    try:
        return str(ev(ast.parse(expression.strip(), mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError):
        return "error: could not evaluate " + expression


def search(query: str) -> str:
    return next((fact for key, fact in FACTS.items() if key in query.lower()), "No results.")


TOOLS = {"Search": search, "Calculate": calculator}

DEMONSTRATION = """Question: How many days are there in three weeks?
Thought 1: A week has 7 days, so I multiply 7 by 3.
Action 1: Calculate[7 * 3]
Observation 1: 21
Thought 2: Three weeks have 21 days.
Action 2: Finish[21 days]

"""


@sgl.function
def react(s, question, max_steps=4):
    s += ("Answer the question. Think step by step. Each step is a Thought, then an Action: "
          "Search[entity], Calculate[expression] or Finish[answer].\n\n")
    s += DEMONSTRATION
    s += "Question: " + question + "\n"
    for i in range(1, max_steps + 1):
        s += f"Thought {i}:" + sgl.gen(f"thought_{i}", max_tokens=48, stop="\n") + "\n"
        s += f"Action {i}: " + sgl.select(f"action_{i}", choices=["Search", "Calculate", "Finish"])
        s += "[" + sgl.gen(f"argument_{i}", max_tokens=24, stop="]") + "]\n"
        action, argument = s[f"action_{i}"], s[f"argument_{i}"]
        if action == "Finish":
            s["answer"] = argument
            return
        s += f"Observation {i}: " + TOOLS[action](argument) + "\n"
    s += "Final answer:" + sgl.gen("answer", max_tokens=24, stop="\n")


if __name__ == "__main__":
    setup(__doc__)
    state = react.run(question="How much taller is the Eiffel Tower than the Statue of Liberty, in metres?",
                      temperature=0)
    print(state.text())
    print("Answer:", state["answer"])
