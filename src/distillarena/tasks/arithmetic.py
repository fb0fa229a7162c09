"""The built-in arithmetic reasoning task: expressions of 1 to 4 operations with a chain of thought.

A problem is a binary expression tree over small non-negative integers with ``+``, ``-`` and ``*``
(usual precedence, parentheses only where the tree needs them). A solution writes one line per
operation, ``left<op>right=value``, then ``Answer: value``. Any operation whose operands are already
numbers can be computed next, so a problem with independent sub-expressions (``2*3+4*5``,
``(7+8)*(9-4)``) has several valid step orders: the topological orders of its tree. Training data
draws one of them at random, so a teacher trained on it is genuinely multi-modal at the first step of
such problems; that is what makes mode coverage, entropy and forward-vs-reverse KL measurable here.

Splits are disjoint by construction: a problem's split is a hash of its canonical expression, so the
same expression can never be in two splits whatever the seeds and sizes asked for.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from itertools import permutations

from distillarena.core.errors import UserError

OPS = ("+", "-", "*")
COMMUTATIVE = ("+", "*")
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
OP_WORDS = {"+": "the sum of", "-": "the difference of", "*": "the product of"}
SPLITS = ("train", "holdout", "test")
# Share of the hash space each split owns; train gets the rest.
SPLIT_SHARES = {"test": 0.10, "holdout": 0.10}
ANSWER_PREFIX = "Answer: "
STEP_RE = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(-?\d+)\s*$")
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Node:
    """An expression tree node: a leaf number (``op is None``) or a binary operation."""

    op: str | None = None
    value: int = 0
    left: Node | None = None
    right: Node | None = None

    def evaluate(self) -> int:
        if self.op is None:
            return self.value
        a, b = self.left.evaluate(), self.right.evaluate()
        return apply_op(self.op, a, b)

    def render(self) -> str:
        """Infix text with the minimal parentheses that keep the tree (left-associative operators)."""
        if self.op is None:
            return str(self.value)
        left = self.left.render()
        right = self.right.render()
        if self.left.op is not None and PRECEDENCE[self.left.op] < PRECEDENCE[self.op]:
            left = f"({left})"
        # The right child needs parentheses at equal precedence too: 5-(3-1), 2*(3*4) kept as a tree.
        if self.right.op is not None and PRECEDENCE[self.right.op] <= PRECEDENCE[self.op]:
            right = f"({right})"
        return f"{left}{self.op}{right}"

    def render_words(self) -> str:
        """Unambiguous verbal form: 'the sum of 3 and the product of 4 and 5'."""
        if self.op is None:
            return str(self.value)
        return f"{OP_WORDS[self.op]} {self.left.render_words()} and {self.right.render_words()}"

    def n_ops(self) -> int:
        return 0 if self.op is None else 1 + self.left.n_ops() + self.right.n_ops()


def apply_op(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def _operation_nodes(root: Node) -> list[Node]:
    """Operation nodes in post-order; a node's children always come before it."""
    out: list[Node] = []

    def visit(n: Node) -> None:
        if n.op is None:
            return
        visit(n.left)
        visit(n.right)
        out.append(n)

    visit(root)
    return out


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem. ``prompt`` is what the model sees; ``answer`` is the true final value."""

    tree: Node
    style: str = "symbolic"  # "symbolic" ("What is 2*3+4?") or "words" (verbal expression)
    commute: float = 0.0  # probability that a random solution writes its first step (+ or *) as "b+a"

    @property
    def expression(self) -> str:
        return self.tree.render()

    @property
    def answer(self) -> int:
        return self.tree.evaluate()

    @property
    def n_ops(self) -> int:
        return self.tree.n_ops()

    @property
    def difficulty(self) -> int:
        """The :class:`~distillarena.tasks.base.TaskProblem` difficulty: the number of operations."""
        return self.n_ops

    @property
    def prompt(self) -> str:
        if self.style == "words":
            return f"What is {self.tree.render_words()}?\n"
        return f"What is {self.expression}?\n"

    @cached_property
    def step_orders(self) -> list[tuple[int, ...]]:
        """Every valid order of computing the operations, as index tuples into ``_operation_nodes``."""
        nodes = _operation_nodes(self.tree)
        index = {id(n): i for i, n in enumerate(nodes)}
        needs = [
            {index[id(c)] for c in (n.left, n.right) if c.op is not None} for n in nodes
        ]
        orders = []
        for perm in permutations(range(len(nodes))):
            seen: set[int] = set()
            ok = True
            for i in perm:
                if not needs[i] <= seen:
                    ok = False
                    break
                seen.add(i)
            if ok:
                orders.append(perm)
        return orders

    @property
    def n_solutions(self) -> int:
        """Distinct valid chains of thought: the step orders, each twice when operands may be swapped and its first
        step is a + or a *."""
        if self.commute <= 0:
            return len(self.step_orders)
        nodes = _operation_nodes(self.tree)
        return sum(2 if nodes[order[0]].op in COMMUTATIVE else 1 for order in self.step_orders)

    def solution(self, order: tuple[int, ...] | None = None, swapped: frozenset[int] = frozenset()) -> str:
        """The chain of thought for one step order (the first valid order when ``order`` is None), writing the
        operations whose indices are in ``swapped`` (+ and * only) with their operands exchanged."""
        nodes = _operation_nodes(self.tree)
        if order is None:
            order = self.step_orders[0]
        if tuple(order) not in set(self.step_orders):
            raise ValueError(f"{order} is not a valid step order for {self.expression}")
        lines = []
        for i in order:
            n = nodes[i]
            a, b = n.left.evaluate(), n.right.evaluate()
            if i in swapped and n.op in COMMUTATIVE:
                a, b = b, a
            lines.append(f"{a}{n.op}{b}={apply_op(n.op, a, b)}")
        lines.append(f"{ANSWER_PREFIX}{self.answer}")
        return "\n".join(lines)

    def all_solutions(self) -> list[str]:
        return [self.solution(o) for o in self.step_orders]

    def random_solution(self, rng: random.Random) -> str:
        order = rng.choice(self.step_orders)
        if self.commute <= 0:  # (no draw at all: the data of a world without swaps is what it always was)
            return self.solution(order)
        # only the first step's operands: a choice at the very first completion token (like the step order's),
        # after which the chain is the canonical one (swapping every step made the task much harder to learn:
        # docs/decisions.md, "A second mode on every prompt")
        swapped = frozenset({order[0]}) if rng.random() < self.commute else frozenset()
        return self.solution(order, swapped)

    @property
    def split(self) -> str:
        return split_of(self.expression)


def split_of(expression: str) -> str:
    """The split an expression belongs to, fixed by a hash of its canonical text."""
    h = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") / 2**64
    if h < SPLIT_SHARES["test"]:
        return "test"
    if h < SPLIT_SHARES["test"] + SPLIT_SHARES["holdout"]:
        return "holdout"
    return "train"


@dataclass(frozen=True)
class ArithmeticConfig:
    """Number ranges of the generator.

    The defaults make every number two digits wide (leaves, intermediate values and answers in [10, 99]; only
    multipliers are single digits), so a tiny model learns the task in minutes: with fixed widths, the digit a
    result depends on sits at a fixed distance, and no model has to learn place-value alignment first.
    Widen the ranges for a harder world.
    """

    add_min: int = 10  # leaves (operands of + and -) are drawn from [add_min, add_max]
    add_max: int = 60
    mul_max: int = 9  # one operand of every * is a leaf drawn from [2, mul_max]
    min_value: int = 10  # every intermediate value stays in [min_value, max_value]
    max_value: int = 99
    word_fraction: float = 0.0  # share of problems rendered as verbal expressions
    commute: float = 0.0  # probability that a training solution writes its first step (+ or *) as "b+a": a second mode

    def __post_init__(self) -> None:
        if not 0 <= self.add_min <= self.add_max or not 0 <= self.min_value <= self.max_value or self.mul_max < 2:
            raise UserError(f"invalid arithmetic ranges {self}: need 0 <= add_min <= add_max, "
                            "0 <= min_value <= max_value and mul_max >= 2")


@dataclass
class ArithmeticTask:
    """Seeded generator of problems for one split and difficulty (number of operations); a
    :class:`~distillarena.tasks.base.Task`."""

    config: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    name = "arithmetic"
    answer_prefix = ANSWER_PREFIX

    def extract_answer(self, completion: str) -> int | None:
        return extract_answer(completion)

    def check(self, problem: Problem, completion: str) -> bool:
        return check_answer(problem, completion)

    def step_validity(self, completion: str) -> float:
        return step_validity(completion)

    def _random_tree(self, rng: random.Random, n_ops: int) -> Node:
        if n_ops == 0:
            return Node(value=rng.randint(self.config.add_min, self.config.add_max))
        rest = n_ops - 1
        # Favour balanced shapes: they have independent sub-expressions, hence several step orders.
        n_left = rng.choice((rest // 2, rest - rest // 2)) if rng.random() < 0.7 else rng.randint(0, rest)
        op = rng.choice(OPS)
        if op == "*":
            # Keep products small: one side of a product is a small leaf.
            small = Node(value=rng.randint(2, self.config.mul_max))
            other = self._random_tree(rng, n_ops - 1)
            left, right = (small, other) if rng.random() < 0.5 else (other, small)
        else:
            left = self._random_tree(rng, n_left)
            right = self._random_tree(rng, n_ops - 1 - n_left)
        return Node(op=op, left=left, right=right)

    def _valid(self, tree: Node) -> bool:
        for n in _operation_nodes(tree):
            v = n.evaluate()
            if v < self.config.min_value or v > self.config.max_value:
                return False
        return True

    def sample(self, rng: random.Random, n_ops: int) -> Problem:
        if not 1 <= n_ops <= 4:
            raise UserError(f"number of operations must be between 1 and 4, got {n_ops}")
        while True:
            tree = self._random_tree(rng, n_ops)
            if self._valid(tree):
                style = "words" if rng.random() < self.config.word_fraction else "symbolic"
                return Problem(tree, style, self.config.commute)

    def problems(self, split: str, n: int, n_ops: int | list[int], seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``; ``n_ops`` may be a list to mix difficulties evenly."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        difficulties = [n_ops] if isinstance(n_ops, int) else list(n_ops)
        # Seed from the split name too, so that splits do not consume the same random stream.
        rng = random.Random(f"{seed}:{split}:{','.join(map(str, difficulties))}")
        out: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 200 * n + 10_000:
                raise UserError(
                    f"could not draw {n} distinct {split} problems with {difficulties} operations: "
                    "the problem space is too small for that many; ask for fewer"
                )
            p = self.sample(rng, difficulties[len(out) % len(difficulties)])
            if p.split != split or p.expression in seen:
                continue
            seen.add(p.expression)
            out.append(p)
        return out


# --- checkers -----------------------------------------------------------------------------------


def extract_answer(completion: str) -> int | None:
    """The value on the first ``Answer:`` line, or None when the completion has none."""
    m = ANSWER_RE.search(completion)
    return int(m.group(1)) if m else None


def check_answer(problem: Problem | int, completion: str) -> bool:
    """True when the completion's final answer equals the problem's true answer."""
    expected = problem if isinstance(problem, int) else problem.answer
    return extract_answer(completion) == expected


def step_validity(completion: str) -> float:
    """Fraction of step lines that are arithmetically correct; a line that is not a step counts as invalid.

    The ``Answer:`` line is not a step. A completion with no step line scores 0.
    """
    lines = [ln for ln in completion.split("\n") if ln.strip() and not ln.strip().startswith("Answer")]
    if not lines:
        return 0.0
    good = 0
    for ln in lines:
        m = STEP_RE.match(ln)
        if m and apply_op(m.group(2), int(m.group(1)), int(m.group(3))) == int(m.group(4)):
            good += 1
    return good / len(lines)
