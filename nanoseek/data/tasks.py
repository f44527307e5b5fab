"""Verifiable reasoning tasks: generated problems with worked solutions and answer checkers.

These are the built-in data of the speedrun: pretraining text, cold-start SFT examples (prompt ->
`<think>\\n...steps...\\n</think>\\n<answer>X</answer>`) and GRPO prompts whose rewards come from the
checkers here. Three tasks, five difficulty levels each:

- `arithmetic`: multi-digit +, - and * with column-wise carries and borrows.
- `countdown`: reach a target from given numbers with + - * /, each number at most once.
- `word_problem`: the same arithmetic told as a short story, in English or Chinese.

Everything is a pure function of its arguments (seeded `random.Random`). The train / test split of a
problem is decided by a hash of its canonical content (`Problem.key`: the operation and operands, not
the wording), so the same arithmetic can never be trained on in one language or task and tested in
another. Worked solutions are deliberately terse (tens of tokens): a ~3M-parameter model learns them.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.errors import ConfigError, DataError

TASKS = ("arithmetic", "countdown", "word_problem")
SPLITS = ("train", "test")
LANGUAGES = ("en", "zh")
DIFFICULTIES = (1, 2, 3, 4, 5)
HELD_OUT_PERCENT = 10  # share of problem keys that belong to the test split


@dataclass(frozen=True)
class Problem:
    """One generated problem. `solution` is the full target completion (cold-start SFT data)."""

    id: str
    task: str
    prompt: str
    answer: str  # the gold final answer: a number, or for countdown one valid expression
    solution: str  # "<think>\n...\n</think>\n<answer>{answer}</answer>"
    language: str
    difficulty: int
    split: str
    key: str  # canonical content that decides the split, e.g. "add:285:347"
    numbers: tuple[int, ...] = ()  # countdown: the numbers that may be used
    target: int | None = None  # countdown: the value to reach

    def messages(self) -> list[dict[str, str]]:
        """The problem as a chat: the user prompt and the worked solution as the assistant reply."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.solution}]


@dataclass(frozen=True)
class CheckResult:
    """The verdict of a checker, with the reason and the extracted answer so a reward can be explained."""

    correct: bool
    reason: str
    extracted: str | None = None


def split_of(key: str) -> str:
    """The split of a problem with canonical content `key`: a stable hash, not the generator's seed."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < HELD_OUT_PERCENT else "train"


def format_solution(steps: Sequence[str], answer: str) -> str:
    return "<think>\n" + "\n".join(steps) + "\n</think>\n<answer>" + answer + "</answer>"


# ------------------------------------------------------------------------------------------- arithmetic
def _digits(value: int, width: int) -> list[int]:
    """Least significant digit first, zero-padded to `width`."""
    return [(value // 10**i) % 10 for i in range(width)]


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def addition_steps(a: int, b: int) -> list[str]:
    """One line per column, least significant first: `x+y+carry=sum`; the last line's sum is written whole."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return steps


def subtraction_steps(a: int, b: int) -> list[str]:
    """Columns of `a-b` (a >= b): `x-y-borrow=d`, written `1x-...` when the column borrows ten."""
    width = len(str(a))
    steps, borrow = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        difference = x - y - borrow
        if difference < 0:
            steps.append(f"1{x}-{y}-{borrow}={difference + 10}")
            borrow = 1
        else:
            steps.append(f"{x}-{y}-{borrow}={difference}")
            borrow = 0
    return steps


def multiplication_steps(a: int, b: int) -> list[str]:
    """One partial product per digit of `b` (shifted), then their sum."""
    multipliers = [digit * 10**place for place, digit in enumerate(_digits(b, len(str(b))))]
    partials = [a * multiplier for multiplier in multipliers]
    steps = [f"{a}*{multiplier}={partial}" for multiplier, partial in zip(multipliers, partials, strict=True)]
    if len(partials) > 1:
        steps.append("+".join(str(partial) for partial in partials) + f"={a * b}")
    return steps


def arithmetic_steps(a: int, op: str, b: int) -> list[str]:
    if op == "+":
        return addition_steps(a, b)
    if op == "*":
        return multiplication_steps(a, b)
    if a >= b:
        return subtraction_steps(a, b)
    return [f"-({b}-{a})", *subtraction_steps(b, a)]


def _arithmetic_key(a: int, op: str, b: int) -> str:
    name = {"+": "add", "-": "sub", "*": "mul"}[op]
    if op in "+*":  # commutative: 12+34 and 34+12 are the same problem
        a, b = sorted((a, b))
    return f"{name}:{a}:{b}"


def _draw_operation(rng: random.Random, difficulty: int, ops: str = "+-*") -> tuple[int, str, int]:
    op = rng.choice(ops)
    if op == "*":  # keep products short: d digits times ceil(d/2) digits
        return _operand(rng, difficulty), op, _operand(rng, (difficulty + 1) // 2)
    return _operand(rng, difficulty), op, _operand(rng, difficulty)


def _arithmetic(rng: random.Random, difficulty: int, language: str) -> dict:
    a, op, b = _draw_operation(rng, difficulty)
    prompt = f"Compute {a}{op}{b}." if language == "en" else f"计算{a}{op}{b}。"
    answer = str(eval_exact(a, op, b))
    return dict(prompt=prompt, answer=answer, steps=arithmetic_steps(a, op, b), key=_arithmetic_key(a, op, b))


def eval_exact(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


# ------------------------------------------------------------------------------------------ word problems
NAMES = {"en": ("Tom", "Anna", "Sam", "Maria", "Leo"), "zh": ("小明", "小红", "李雷", "王芳", "张伟")}
# (English plural, Chinese noun, Chinese measure word)
ITEMS = (
    ("apples", "苹果", "个"),
    ("books", "书", "本"),
    ("pencils", "铅笔", "支"),
    ("coins", "硬币", "枚"),
    ("cards", "卡片", "张"),
)
WORD_TEMPLATES = {
    "+": {
        "en": "{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
        "zh": "{name}有{a}{measure}{item}，又得到了{b}{measure}。{name}现在有多少{measure}{item}？",
    },
    "-": {
        "en": "{name} has {a} {items} and gives away {b}. How many {items} are left?",
        "zh": "{name}有{a}{measure}{item}，送出了{b}{measure}。还剩多少{measure}{item}？",
    },
    "*": {
        "en": "There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
        "zh": "有{a}个盒子，每个盒子里有{b}{measure}{item}。一共有多少{measure}{item}？",
    },
}


def _word_problem(rng: random.Random, difficulty: int, language: str) -> dict:
    a, op, b = _draw_operation(rng, difficulty)
    if op == "-" and a < b:  # nobody gives away more than they have
        a, b = b, a
    items, item, measure = rng.choice(ITEMS)
    name = rng.choice(NAMES[language])
    prompt = WORD_TEMPLATES[op][language].format(name=name, a=a, b=b, items=items, item=item, measure=measure)
    steps = [f"{a}{op}{b}", *arithmetic_steps(a, op, b)]
    return dict(prompt=prompt, answer=str(eval_exact(a, op, b)), steps=steps, key=_arithmetic_key(a, op, b))


# --------------------------------------------------------------------------------------------- countdown
# difficulty -> (how many numbers, largest number, largest target)
COUNTDOWN_LEVELS = {1: (3, 10, 100), 2: (3, 20, 100), 3: (4, 25, 500), 4: (4, 50, 1000), 5: (5, 100, 1000)}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(left: tuple[int, str, int], op: str, right: tuple[int, str, int]) -> tuple[int, str, int]:
    """(value, expression, precedence) of `left op right`, with only the parentheses it needs."""
    (a, a_text, a_prec), (b, b_text, b_prec) = left, right
    precedence = _PRECEDENCE[op]
    if a_prec < precedence:
        a_text = f"({a_text})"
    if b_prec < precedence or (b_prec == precedence and op in "-/"):
        b_text = f"({b_text})"
    value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
    return value, f"{a_text}{op}{b_text}", precedence


def _countdown(rng: random.Random, difficulty: int, language: str) -> dict:
    count, largest, max_target = COUNTDOWN_LEVELS[difficulty]
    while True:
        numbers = [rng.randint(1, largest) for _ in range(count)]
        pool = [(n, str(n), 3) for n in numbers]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            left, right = pool[i], pool[j]
            if left[0] < right[0]:
                left, right = right, left
            ops = (
                ["+", "*"] + ["-"] * (left[0] > right[0]) + ["/"] * (right[0] > 1 and left[0] % right[0] == 0)
            )
            op = rng.choice(ops)
            combined = _combine(left, op, right)
            steps.append(f"{left[0]}{op}{right[0]}={combined[0]}")
            pool = [item for k, item in enumerate(pool) if k not in (i, j)] + [combined]
        target, expression, _ = pool[0]
        if 1 <= target <= max_target and target not in numbers:
            break
    listed = ", ".join(map(str, numbers)) if language == "en" else "、".join(map(str, numbers))
    if language == "en":
        prompt = f"Use the numbers {listed} to make {target} with + - * /, each number at most once."
    else:
        prompt = f"用数字{listed}算出{target}，可以用+ - * /，每个数字最多用一次。"
    key = "countdown:" + ",".join(map(str, sorted(numbers))) + f":{target}"
    return dict(prompt=prompt, answer=expression, steps=steps, key=key, numbers=tuple(numbers), target=target)


GENERATORS = {"arithmetic": _arithmetic, "countdown": _countdown, "word_problem": _word_problem}


# ------------------------------------------------------------------------------------------ entry points
def _check_choice(name: str, value: object, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, allowed))}")


def _difficulties(difficulty: int | Sequence[int]) -> tuple[int, ...]:
    levels = (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
    for level in levels:
        _check_choice("difficulty", level, DIFFICULTIES)
    if not levels:
        raise ConfigError("give at least one difficulty level")
    return levels


def make_problems(
    task: str,
    split: str = "train",
    count: int = 100,
    seed: int = 0,
    difficulty: int | Sequence[int] = 2,
    language: str | None = None,
) -> list[Problem]:
    """`count` distinct problems of one task from one split; the same arguments give the same list.

    `difficulty` is a level 1-5 or a sequence to draw from uniformly; `language` is "en", "zh" or None
    (drawn per problem). Raises DataError if the level has fewer distinct problems than `count`.
    """
    _check_choice("task", task, TASKS)
    _check_choice("split", split, SPLITS)
    if language is not None:
        _check_choice("language", language, LANGUAGES)
    levels = _difficulties(difficulty)
    rng = random.Random(f"{task}/{split}/{seed}/{levels}/{language}")
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new: the level's problem space is used up
    while len(problems) < count:
        misses += 1
        if misses > 10_000:
            raise DataError(
                f"only {len(problems)} distinct {task} {split} problems found at difficulty {levels}; "
                f"ask for fewer than {count} or use more difficulty levels"
            )
        level = rng.choice(levels)
        problem_language = language or rng.choice(LANGUAGES)
        fields = GENERATORS[task](rng, level, problem_language)
        if split_of(fields["key"]) != split or fields["prompt"] in seen:
            continue
        seen.add(fields["prompt"])
        misses = 0
        problems.append(
            Problem(
                id=f"{task}-{hashlib.sha256(fields['prompt'].encode('utf-8')).hexdigest()[:12]}",
                task=task,
                prompt=fields["prompt"],
                answer=fields["answer"],
                solution=format_solution(fields["steps"], fields["answer"]),
                language=problem_language,
                difficulty=level,
                split=split,
                key=fields["key"],
                numbers=fields.get("numbers", ()),
                target=fields.get("target"),
            )
        )
    return problems


def make_mixed_problems(
    split: str = "train",
    count: int = 100,
    seed: int = 0,
    difficulty: int | Sequence[int] = 2,
    tasks: Sequence[str] = TASKS,
    language: str | None = None,
) -> list[Problem]:
    """`count` problems drawn uniformly over `tasks`, in a seeded random order."""
    if not tasks:
        raise ConfigError("give at least one task")
    rng = random.Random(f"mixed/{split}/{seed}")
    order = [rng.choice(list(tasks)) for _ in range(count)]
    pools = {
        task: iter(make_problems(task, split, order.count(task), seed, difficulty, language))
        for task in set(order)
    }
    return [next(pools[task]) for task in order]


def task_documents(
    count: int,
    seed: int = 0,
    split: str = "train",
    difficulty: int | Sequence[int] = DIFFICULTIES,
    tasks: Sequence[str] = TASKS,
) -> list[str]:
    """Bilingual documents (prompt, newline, worked solution) for tokenizer training and pretraining."""
    return [f"{p.prompt}\n{p.solution}" for p in make_mixed_problems(split, count, seed, difficulty, tasks)]


def task_corpus_text(count: int, seed: int = 0, **kwargs) -> str:
    """`task_documents` joined by blank lines: one text to train a tokenizer on or to write to a file."""
    return "\n\n".join(task_documents(count, seed, **kwargs))


# -------------------------------------------------------------------------------------------- checkers
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in free model text: the last `<answer>...</answer>`, else the last `\\boxed{}`,
    else the last number; None if there is none."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """An exact number from an answer like "632", "-62", "9,022", "12.0" or "$632$"; None otherwise."""
    cleaned = text.strip().strip("$").replace("−", "-").replace(",", "").replace(" ", "").rstrip(".")
    return Fraction(cleaned) if _PLAIN_NUMBER.fullmatch(cleaned) else None


def check_number(text: str, gold: int | str) -> CheckResult:
    """Whether the answer extracted from `text` equals the number `gold` exactly."""
    extracted = extract_answer(text)
    if extracted is None:
        return CheckResult(False, "no answer found", None)
    value = parse_number(extracted)
    if value is None:
        return CheckResult(False, f"answer {extracted!r} is not a number", extracted)
    if value != Fraction(str(gold)):
        return CheckResult(False, f"expected {gold}, got {extracted}", extracted)
    return CheckResult(True, "correct", extracted)


_MAX_EXPRESSION_CHARS = 200  # longer answers are not countdown solutions (and deep nesting can crash ast)
_OPERATOR_SPELLINGS = {
    "\\times": "*",
    "\\cdot": "*",
    "\\div": "/",
    "×": "*",
    "x": "*",
    "X": "*",
    "÷": "/",
    "−": "-",
}
_BINARY_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value and the integer literals of an arithmetic expression with + - * / and parentheses.

    Parsed with `ast` and evaluated node by node with Fractions (never `eval`); anything else (unary
    minus, powers, names, calls, floats) raises ValueError with the reason.
    """
    for spelling, operator in _OPERATOR_SPELLINGS.items():
        expression = expression.replace(spelling, operator)
    expression = expression.split("=")[0].strip()
    if not expression:
        raise ValueError("empty expression")
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    if not re.fullmatch(r"[\d+\-*/() \t]+", expression):
        raise ValueError(f"{expression!r} has characters other than digits, + - * / and parentheses")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as error:
        raise ValueError(f"{expression!r} is not a valid expression") from error
    literals: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"{ast.unparse(node)!r} is not allowed (only + - * / on the given numbers)")

    return value(tree.body), literals


def check_countdown(text: str, numbers: Sequence[int], target: int) -> CheckResult:
    """Whether the extracted expression uses only `numbers` (each at most once) and equals `target`."""
    extracted = extract_answer(text)
    if extracted is None:
        return CheckResult(False, "no answer found", None)
    try:
        result, literals = evaluate_expression(extracted)
    except ValueError as error:
        return CheckResult(False, str(error), extracted)
    overused = Counter(literals) - Counter(numbers)
    if overused:
        extra = ", ".join(str(n) for n in sorted(overused.elements()))
        return CheckResult(False, f"uses numbers that are not available: {extra}", extracted)
    if result != target:
        return CheckResult(False, f"expression equals {result}, not {target}", extracted)
    return CheckResult(True, "correct", extracted)


def check_answer(problem: Problem, text: str) -> CheckResult:
    """Check model text against a problem with the task's own checker."""
    if problem.task == "countdown":
        assert problem.target is not None
        return check_countdown(text, problem.numbers, problem.target)
    return check_number(text, problem.answer)


def check_format(text: str) -> CheckResult:
    """Whether `text` is `<think>...</think>` then `<answer>...</answer>`, each exactly once, and nothing after.

    Counting the tags stops the hacks seen in the wild (several answer blocks, repeated closing tags);
    only whitespace may stand outside the two blocks, and the answer may not be empty.
    """
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    for tag in tags:
        occurrences = text.count(tag)
        if occurrences != 1:
            return CheckResult(False, f"{tag} appears {occurrences} times, expected once")
    think, think_end, answer, answer_end = (text.index(tag) for tag in tags)
    if not think < think_end < answer < answer_end:
        return CheckResult(False, "tags out of order")
    if text[:think].strip():
        return CheckResult(False, "text before <think>")
    if text[think_end + len("</think>") : answer].strip():
        return CheckResult(False, "text between </think> and <answer>")
    if text[answer_end + len("</answer>") :].strip():
        return CheckResult(False, "text after </answer>")
    extracted = text[answer + len("<answer>") : answer_end].strip()
    if not extracted:
        return CheckResult(False, "empty answer", extracted)
    return CheckResult(True, "well formed", extracted)
