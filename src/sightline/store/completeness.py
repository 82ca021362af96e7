"""Whether a store is finished, as the analyses check it: refuse an interrupted extraction, or warn loudly."""

from __future__ import annotations

from typing import Any

from sightline.errors import UserError


def completeness(store) -> dict[str, Any]:
    """{incomplete, n_planned, n_written, n_skipped, n_missing}; a store that does not say how many
    examples it planned (manifest n_examples) counts as complete: nothing says otherwise."""
    planned = store.manifest.get("n_examples")
    written, skipped = len(store.examples), len(store.skipped)
    if not isinstance(planned, int):
        return {"incomplete": False, "n_planned": None, "n_written": written, "n_skipped": skipped, "n_missing": 0}
    done = {e["example"] for e in store.examples} | {e["example"] for e in store.skipped}
    missing = sum(1 for i in range(planned) if i not in done)
    return {"incomplete": missing > 0, "n_planned": planned, "n_written": written, "n_skipped": skipped,
            "n_missing": missing}


def require_complete(store, allow_incomplete: bool = False) -> tuple[dict[str, Any], list[str]]:
    """(completeness(store), warnings). An incomplete store is a UserError naming it and the fix, unless
    `allow_incomplete`: then one warning says what is missing (the run uses only what was written)."""
    c = completeness(store)
    if not c["incomplete"]:
        return c, []
    what = (f"store {store.path} is incomplete: {c['n_written']} of {c['n_planned']} examples written "
            f"({c['n_missing']} missing; an interrupted extraction)")
    if not allow_incomplete:
        raise UserError(f"{what}; finish it with `sightline extract ... --resume` (the same command plus "
                        "--resume), or pass --allow-incomplete to use what is there")
    return c, [f"{what}: results cover only the written examples (--allow-incomplete)"]
