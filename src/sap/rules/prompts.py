"""Prompt templates and the fixed strings of the Search-R1 protocol (one home for each).

The models were trained on these exact strings, so they are reproduced verbatim: the user
prompt is ``prompt[0].content`` of Search-R1's ``nq_search`` parquet, the observation block
is what its rollout appends after a ``</search>``, and the invalid-action message is what it
appends after a turn with neither a search nor an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

SEARCHR1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. "
)

#: The instruction the paper's AFM preprocessing (``afm_mhqa_search.py``) puts in every record:
#: the Search-R1 instruction without its trailing space and without the question.
AFM_SEARCHR1_INSTRUCTION = SEARCHR1_INSTRUCTION.rstrip(" ")

INVALID_ACTION_MESSAGE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)


def normalize_question(question: str) -> str:
    """Strip the question and end it with ``?`` (what Search-R1's data builder does)."""
    q = question.strip()
    if q and not q.endswith("?"):
        q += "?"
    return q


def searchr1_prompt(question: str) -> str:
    return f"{SEARCHR1_INSTRUCTION}Question: {normalize_question(question)}\n"


#: Registered templates: name -> function(question) -> user prompt text.
TEMPLATES: dict[str, Callable[[str], str]] = {"searchr1": searchr1_prompt}


def build_prompt(question: str, template: str = "searchr1") -> str:
    try:
        return TEMPLATES[template](question)
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; known: {sorted(TEMPLATES)}") from None


def chat_messages(question: str, template: str = "searchr1") -> list[dict[str, str]]:
    """The chat the policy sees: one user turn (the model's chat template adds its default
    system prompt, as in Search-R1)."""
    return [{"role": "user", "content": build_prompt(question, template)}]


def split_contents(contents: str) -> tuple[str, str]:
    """Search-R1 corpus ``contents`` -> (title, text): the title is the first line (its
    quotes kept), the text the rest."""
    title, _, text = contents.partition("\n")
    return title, text


def format_docs(docs: Sequence[Mapping[str, object]]) -> str:
    """Retrieved documents as Search-R1 writes them: ``Doc {i}(Title: {title}) {text}``, one
    per line. Each doc has ``contents`` (Search-R1 layout) or ``title`` and ``text``."""
    lines = []
    for i, doc in enumerate(docs, start=1):
        if "contents" in doc:
            title, text = split_contents(str(doc["contents"]))
        else:
            title, text = str(doc.get("title", "")), str(doc.get("text", ""))
        lines.append(f"Doc {i}(Title: {title}) {text}")
    return "\n".join(lines) + ("\n" if lines else "")


def information_block(docs_text: str) -> str:
    """The observation appended to the context after a ``</search>``."""
    return f"\n\n<information>{docs_text.strip()}</information>\n\n"


# --- the paper's evaluation script (infer.py), reproduced exactly under ``protocol: paper`` ----


def paper_docs_text(docs: Sequence[Mapping[str, object]]) -> str:
    """Retrieved documents as the paper's ``infer.py`` writes them: ``Doc {i}(Title: {title})
    {text}`` with each text stripped, joined by newlines, no trailing newline (sap's
    :func:`format_docs` keeps each text as is and ends every line with a newline)."""
    lines = []
    for i, doc in enumerate(docs, start=1):
        title, text = split_contents(str(doc["contents"])) if "contents" in doc else (str(doc.get("title", "")), str(doc.get("text", "")))
        lines.append(f"Doc {i}(Title: {title}) {text.strip()}")
    return "\n".join(lines)


def paper_context(context: str, output: str, docs_text: str) -> str:
    """The paper's next context after a search turn: the blank line goes *before* the model's
    turn, which is copied back in, and the documents are not stripped."""
    return f"{context}\n\n{output}<information>{docs_text}</information>\n\n"
