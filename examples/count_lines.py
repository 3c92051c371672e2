"""Lines of code of Python files: non-blank lines that are neither comments nor docstrings.

    python examples/count_lines.py examples/document_analysis_plait.py examples/document_analysis_openai.py
"""

import ast
import sys


def lines_of_code(path: str) -> int:
    source = open(path, encoding="utf-8").read()
    docstring_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            is_string = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            if is_string and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    return sum(1 for number, line in enumerate(source.splitlines(), start=1)
               if line.strip() and not line.strip().startswith("#") and number not in docstring_lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}: {lines_of_code(path)} lines of code, {len(open(path).read().splitlines())} lines")
