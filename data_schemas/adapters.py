"""Per-row format adapters: map accepted input forms (TRL conversational / standard, ranked lists)
to our native record fields BEFORE validation.

Each adapter returns ``(normalized_row, PathMap)``; the ``PathMap`` translates an error location
in the normalized row back to the field names of the original row (``responses.0.content`` ->
``chosen.0.content``). Structural problems that cannot be expressed after normalization raise
:class:`RowError` with the original field name.
"""

from __future__ import annotations

from typing import Any

Loc = tuple[Any, ...]
_PREFERENCE_ONLY = ("chosen", "rejected", "responses", "strength", "margin", "domain", "edited")


class RowError(Exception):
    """A row that cannot be normalized; ``field`` uses the original row's names."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PathMap:
    """Longest-prefix rewrite rules from normalized locations to original ones."""

    def __init__(self) -> None:
        self.rules: list[tuple[Loc, Loc, bool]] = []

    def add(self, new: Loc, old: Loc, keep_rest: bool = True) -> None:
        self.rules.append((new, old, keep_rest))

    def __call__(self, loc: Loc) -> Loc:
        best = None
        for rule in self.rules:
            new = rule[0]
            if loc[: len(new)] == new and (best is None or len(new) > len(best[0])):
                best = rule
        if best is None:
            return loc
        new, old, keep_rest = best
        return old + (loc[len(new) :] if keep_rest else ())


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _as_messages(value: Any, field: str, role: str) -> tuple[list[Any], str]:
    """A message list from a list, a single message object, or a plain string (-> ``role``)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}], "str"
    if isinstance(value, list):
        return value, "list"
    if isinstance(value, dict):
        return [value], "dict"
    raise RowError(field, f"expected a list of messages or a string, got {json_type(value)}")


def _map_seq(pm: PathMap, new: Loc, offset: int, old: str, items: list[Any], form: str) -> None:
    if form == "str":
        pm.add((*new, offset), (old,), keep_rest=False)
    elif form == "dict":
        pm.add((*new, offset), (old,))
    else:
        for i in range(len(items)):
            pm.add((*new, offset + i), (old, i))


def _prompt(out: dict[str, Any], pm: PathMap) -> None:
    """A string (or single-message) prompt becomes a one-message list."""
    if "prompt" in out and not isinstance(out["prompt"], list):
        msgs, form = _as_messages(out["prompt"], "prompt", "user")
        out["prompt"] = msgs
        _map_seq(pm, ("prompt",), 0, "prompt", msgs, form)


def adapt_sft(row: dict[str, Any]) -> tuple[dict[str, Any], PathMap]:
    """Native/TRL ``messages`` rows pass through; TRL prompt-completion -> ``messages``."""
    pm = PathMap()
    if "messages" in row or not ({"prompt", "completion"} & row.keys()):
        return row, pm
    out = dict(row)
    for k in ("prompt", "completion"):
        if k not in out:
            raise RowError(k, "missing field (prompt-completion rows need both 'prompt' and 'completion')")
    p, pform = _as_messages(out.pop("prompt"), "prompt", "user")
    c, cform = _as_messages(out.pop("completion"), "completion", "assistant")
    out["messages"] = [*p, *c]
    pm.add(("messages",), ("completion",), keep_rest=False)  # whole-list errors concern the ending
    _map_seq(pm, ("messages",), 0, "prompt", p, pform)
    _map_seq(pm, ("messages",), len(p), "completion", c, cform)
    return out, pm


def _implicit_prompt(chosen: Any, rejected: Any, pm: PathMap) -> tuple[list[Any], list[Any]]:
    """TRL implicit-prompt form: split two full conversations at their longest common prefix."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise RowError("prompt", "missing field (needed unless chosen/rejected are full conversations)")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise RowError("prompt", "missing field (chosen and rejected share no leading prompt turns)")
    last = chosen[k - 1]
    if isinstance(last, dict) and last.get("role") != "user":
        raise RowError("chosen", f"the {k} turns shared with rejected (the prompt) must end with a user turn")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) - k != 1:
            raise RowError(
                name,
                f"must be the shared prompt plus one assistant message "
                f"(got {len(conv) - k} messages after the {k} shared ones)",
            )
    pm.add(("prompt",), ("chosen",))
    pm.add(("responses", 0), ("chosen", k))
    pm.add(("responses", 1), ("rejected", k))
    return chosen[:k], [chosen[k], rejected[k]]


def adapt_preference(row: dict[str, Any]) -> tuple[dict[str, Any], PathMap]:
    pm = PathMap()
    out = dict(row)
    if "margin" in out:  # TRL RewardTrainer column -> meta
        _margin_to_meta(out)
    if "chosen" in out or "rejected" in out:
        if _chosen_rejected(out, pm):
            return out, pm
    elif isinstance(out.get("responses"), list):  # native [msg, ...] or ranked [[msg], ...] or strings
        out["responses"] = _ranked_responses(out["responses"], pm)
    _prompt(out, pm)
    return out, pm


def _margin_to_meta(out: dict[str, Any]) -> None:
    margin = out.pop("margin")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RowError("margin", f"expected a number, got {json_type(margin)}")
    if isinstance(out.get("meta", {}), dict):
        out["meta"] = {**out.get("meta", {}), "margin": float(margin)}


def _chosen_rejected(out: dict[str, Any], pm: PathMap) -> bool:
    """TRL's ``chosen``/``rejected`` columns -> ``responses`` (in place); True when the prompt was implicit
    (the common start of both conversations) and the row is complete."""
    if "responses" in out:
        raise RowError("responses", "cannot be combined with 'chosen'/'rejected'")
    for k in ("chosen", "rejected"):
        if k not in out:
            raise RowError(k, "missing field")
    chosen, rejected = out.pop("chosen"), out.pop("rejected")
    if "prompt" not in out:
        out["prompt"], out["responses"] = _implicit_prompt(chosen, rejected, pm)
        return True
    responses = []
    for j, (name, value) in enumerate((("chosen", chosen), ("rejected", rejected))):
        msgs, form = _as_messages(value, name, "assistant")
        if len(msgs) != 1:
            raise RowError(name, f"must hold exactly one assistant message (got {len(msgs)})")
        responses.append(msgs[0])
        _map_seq(pm, ("responses",), j, name, msgs, form)
    out["responses"] = responses
    return False


def _ranked_responses(values: list, pm: PathMap) -> list:
    responses = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            responses.append({"role": "assistant", "content": v})
            pm.add(("responses", i), ("responses", i), keep_rest=False)
        elif isinstance(v, list):
            if len(v) != 1:
                raise RowError(f"responses.{i}", f"must hold exactly one assistant message (got {len(v)})")
            responses.append(v[0])
            pm.add(("responses", i), ("responses", i, 0))
        else:
            responses.append(v)
    return responses


def adapt_prompt(row: dict[str, Any]) -> tuple[dict[str, Any], PathMap]:
    """Prompt rows, or any SFT/preference row reduced to its prompt (other fields dropped)."""
    pm = PathMap()
    out = {k: v for k, v in row.items() if k not in _PREFERENCE_ONLY and k != "completion"}
    if isinstance(row.get("domain"), str) and "tags" not in row:
        out["tags"] = [row["domain"]]
    if "prompt" in row:
        _prompt(out, pm)
    elif "messages" in row:  # SFT row: everything up to the final assistant turn
        msgs = out.pop("messages")
        system = out.pop("system", None)
        if not isinstance(msgs, list):
            raise RowError("messages", f"expected a list of messages, got {json_type(msgs)}")
        last = msgs[-1] if msgs else None
        prompt = msgs[:-1] if isinstance(last, dict) and last.get("role") == "assistant" else list(msgs)
        pm.add(("prompt",), ("messages",))
        if isinstance(system, str):
            prompt = [{"role": "system", "content": system}, *prompt]
            pm.add(("prompt", 0), ("system",), keep_rest=False)
            for i in range(len(prompt) - 1):
                pm.add(("prompt", i + 1), ("messages", i))
        elif system is not None:
            raise RowError("system", f"expected a string or null, got {json_type(system)}")
        out["prompt"] = prompt
    elif "chosen" in row or "rejected" in row:  # implicit-prompt preference row
        pref, ppm = adapt_preference({k: row[k] for k in ("chosen", "rejected") if k in row})
        out["prompt"], pm = pref["prompt"], ppm
    return out, pm


def adapt_scored(row: dict[str, Any]) -> tuple[dict[str, Any], PathMap]:
    pm = PathMap()
    out = dict(row)
    _prompt(out, pm)
    if isinstance(out.get("response"), str):
        out["response"] = {"role": "assistant", "content": out["response"]}
        pm.add(("response",), ("response",), keep_rest=False)
    return out, pm
