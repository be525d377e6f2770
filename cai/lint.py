"""Constitution linter: errors that would break a run, and warnings about principles that read badly.

The public CAI prompt files shipped with a meaning-inverting typo, mixed separators and a few-shot from
another principle family; these checks catch that class of mistake before a long generation run.
Warnings are computed only for a constitution without errors.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from pathlib import Path

from cai.constitution import PRINCIPLE_TEXTS, Constitution, Problem, check_constitution, field_name
from cai.prompts import PROMPTS_DIR
from cai.yamlio import Loc, LocatedYaml

MAX_CHARS = 600  # longer requests crowd the few-shot context of small models
NEAR_DUPLICATE = 0.85  # difflib ratio above which two texts say the same thing

REWRITE_WORDS = re.compile(
    r"\b(re-?writ|revis|edit|chang|rephras|rewor|remov|modif|amend|replac|delet|fix)\w*", re.IGNORECASE
)
CRITIQUE_WORDS = re.compile(
    r"\b(identify|point\w* out|critique|explain|discuss|assess|evaluate|examine|analy[sz]e|describe|list|"
    r"note|find|check|consider|spot|flag|name)\b",
    re.IGNORECASE,
)
OPTION_MARK = re.compile(r"\(\s*[AB]\s*\)")

WARNINGS = {
    "revision-no-rewrite": "the revision request does not ask to rewrite the response",
    "critique-no-request": "the critique request does not ask the model to find problems",
    "feedback-not-question": "the feedback text is not a question",
    "feedback-has-options": "the feedback text lists (A)/(B) options that the template adds itself",
    "too-long": f"a principle text is longer than {MAX_CHARS} characters",
    "near-duplicate": "two principles say nearly the same thing",
    "tag-typo": "a tag looks like a misspelling of another tag",
}


def _warn(doc: LocatedYaml, loc: Loc, code: str, message: str) -> Problem:
    return Problem(str(doc.path), doc.line_of(loc), field_name(loc), "warning", code, message)


def _text_warnings(c: Constitution, doc: LocatedYaml) -> list[Problem]:
    out = []
    for i, p in enumerate(c.principles):
        if not REWRITE_WORDS.search(p.revision):
            out.append(_warn(doc, ("principles", i, "revision"), "revision-no-rewrite",
                             "revision should ask to rewrite the response "
                             "(e.g. 'Rewrite ...', 'Revise ...', 'Remove ...')"))
        if not (CRITIQUE_WORDS.search(p.critique) or p.critique.rstrip().endswith("?")):
            out.append(_warn(doc, ("principles", i, "critique"), "critique-no-request",
                             "critique should ask the model to find problems "
                             "(e.g. 'Identify ...', 'Point out ...', or a question)"))
        if not p.feedback.rstrip().endswith("?"):
            out.append(_warn(doc, ("principles", i, "feedback"), "feedback-not-question",
                             "feedback should be a question comparing two responses, e.g. "
                             "'Which of these assistant responses ...?'"))
        if OPTION_MARK.search(p.feedback):
            out.append(_warn(doc, ("principles", i, "feedback"), "feedback-has-options",
                             "feedback lists options; the feedback template adds (A) and (B) itself"))
        for key in PRINCIPLE_TEXTS:
            size = len(getattr(p, key))
            if size > MAX_CHARS:
                out.append(_warn(doc, ("principles", i, key), "too-long",
                                 f"{key} is {size} characters; keep it under {MAX_CHARS} "
                                 "so prompts fit small models"))
    return out


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _near_duplicates(c: Constitution, doc: LocatedYaml) -> list[Problem]:
    out = []
    for key in PRINCIPLE_TEXTS:
        texts = [_normal(getattr(p, key)) for p in c.principles]
        for j in range(len(texts)):
            for i in range(j):
                m = difflib.SequenceMatcher(None, texts[i], texts[j], autojunk=False)
                if m.quick_ratio() > NEAR_DUPLICATE and (ratio := m.ratio()) > NEAR_DUPLICATE:
                    line = doc.line_of(("principles", i, key))
                    out.append(_warn(doc, ("principles", j, key), "near-duplicate",
                                     f"{ratio:.0%} similar to the {key} of {c.principles[i].id!r} "
                                     f"(line {line})"))
                    break
    return out


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, for telling a misspelt tag from a different tag."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _is_typo(tag: str, other: str) -> bool:
    """One slip in a tag of 4+ characters, or two in a tag of 8+ ('legal' vs 'illegal' is not a typo)."""
    allowed = 2 if min(len(tag), len(other)) >= 8 else 1 if min(len(tag), len(other)) >= 4 else 0
    return 0 < _edit_distance(tag, other) <= allowed


def _tag_typos(c: Constitution, doc: LocatedYaml) -> list[Problem]:
    """A rarer tag close to a more common one is flagged where it first appears."""
    counts = Counter(t for p in c.principles for t in p.tags)
    first_use = {}
    for i, p in enumerate(c.principles):
        for k, tag in enumerate(p.tags):
            first_use.setdefault(tag, (i, k))
    out = []
    for tag, uses in counts.items():
        for other, other_uses in counts.items():
            rarer = uses < other_uses or (uses == other_uses and first_use[tag] > first_use[other])
            if rarer and _is_typo(tag, other):
                i, k = first_use[tag]
                out.append(_warn(doc, ("principles", i, "tags", k), "tag-typo",
                                 f"tag {tag!r} (used {uses}x) looks like a typo of {other!r} "
                                 f"(used {other_uses}x)"))
                break
    return out


def _few_shot_problem(c: Constitution, doc: LocatedYaml, shared_dirs: tuple[Path, ...]) -> Problem | None:
    """A few-shot path must stay inside the constitution's folder (or the bundled prompts/, or a shared
    prompt folder the user names): a constitution passed around should not read '../../etc/passwd'."""
    line = doc.line_of(("few_shot",))
    target = c.few_shot_path
    roots = [doc.path.resolve().parent, PROMPTS_DIR, *(d.resolve() for d in shared_dirs)]
    if not any(target.is_relative_to(root) for root in roots):
        return Problem(str(doc.path), line, "few_shot", "error", "few-shot-outside",
                       f"few_shot {c.few_shot!r} resolves to {target}, outside the constitution's folder "
                       f"{roots[0]}; move the file next to the constitution, or allow a shared prompt folder "
                       "with --few-shot-dir DIR")
    if not target.is_file():
        return Problem(str(doc.path), line, "few_shot", "error", "few-shot-missing",
                       f"few-shot file not found: {target}")
    return None


def lint_constitution(path: str | Path, ignore: frozenset[str] = frozenset(),
                      shared_dirs: tuple[Path, ...] = ()) -> list[Problem]:
    """Errors (a missing few-shot file, or one outside the allowed folders, too) and, for a valid
    constitution, warnings; sorted by line."""
    constitution, problems, doc = check_constitution(path)
    if constitution is None or doc is None:
        return problems
    if (few_shot := _few_shot_problem(constitution, doc, shared_dirs)) is not None:
        problems.append(few_shot)
    warnings = [*_text_warnings(constitution, doc), *_near_duplicates(constitution, doc),
                *_tag_typos(constitution, doc)]
    problems += [w for w in warnings if w.code not in ignore]
    return sorted(problems, key=lambda p: p.line or 0)
