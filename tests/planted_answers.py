"""The common wrong answers of each coding exercise, planted as a student would write them.

Each `<folder>/TEACHER.md` lists the mistakes students make in its coding exercises; every one of
them is here, as the code a student would put between the exercise's fences. The tests marked
`exercise(N)` must give each of them a score of 0 (`test_planted_answers.py`): a wrong answer
that passes one test of its exercise gets partial credit from tools/grade.py, which is a hole in
the tests, not a kindness.

ANSWERS[folder][N][name] = the region's code (a list of texts when the exercise has several
regions, in file order). Indentation: write the code at column 0; it is indented like the
reference region when planted.
"""

from __future__ import annotations

import re
import textwrap

ANSWERS: dict[str, dict[int, dict[str, str | list[str]]]] = {
    "example_paper": {
        1: {
            "a sum instead of a mean": (
                "eps = 1e-12\n"
                "loss = -np.sum(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))"
                " + 0.5 * lam * w @ w\n"),
            "the penalty without its 1/2": (
                "eps = 1e-12\n"
                "loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))"
                " + lam * w @ w\n"),
            "the sign flipped": (
                "eps = 1e-12\n"
                "loss = np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))"
                " + 0.5 * lam * w @ w\n"),
        },
        2: {
            "y - p instead of p - y": "grad = X.T @ (y - p) / len(y) + lam * w\n",
            "no division by N": "grad = X.T @ (p - y) + lam * w\n",
            "the penalty's gradient forgotten": "grad = X.T @ (p - y) / len(y)\n",
        },
    },
}


BEGIN = re.compile(r"^([ \t]*)# BEGIN SOLUTION \(exercise (\d+)\)", re.M)


def as_student_file(reference: str, n: int, bodies: str | list[str]) -> str:
    """The reference file with exercise n's region(s) holding `bodies` (a student's file)."""
    bodies = [bodies] if isinstance(bodies, str) else list(bodies)
    out, rest, k = [], reference, 0
    while True:
        m = next((m for m in BEGIN.finditer(rest) if int(m.group(2)) == n), None)
        if m is None:
            break
        indent = m.group(1)
        end = rest.index("# END SOLUTION", m.end())
        end_line = rest.rfind("\n", 0, end) + 1
        body = textwrap.indent(textwrap.dedent(bodies[k]), indent)
        first_line_end = rest.index("\n", m.end()) + 1
        out.append(rest[:first_line_end] + body)
        rest = rest[end_line:]
        k += 1
    if k != len(bodies):
        raise ValueError(f"exercise {n} has {k} region(s), the answer gives {len(bodies)}")
    return "".join(out) + rest
