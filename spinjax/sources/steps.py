"""``--steps`` parsing (SPEC section 2): all | last | a,b,c | start:stop:stride | a mix."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError, nearest, shown


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--steps {shown(spec)}: {shown(text, 40)} is not a step number") from None


def select_steps(spec: str, offered: Sequence[int]) -> list[int]:
    """The offered steps that ``spec`` names, in the order first named, without repeats.

    A range ``start:stop[:stride]`` takes the offered steps s with start <= s <= stop and
    (s - start) divisible by stride (start/stop may be empty: open ends). A single step the
    model does not offer is an error that names the nearest offered ones.
    """
    offered = sorted(set(offered))
    quoted = shown(spec)  # a spec can list thousands of steps: messages quote its start
    if not offered:
        raise InputError("the model offers no checkpoints")
    chosen: list[int] = []
    for token in (t.strip() for t in spec.split(",")):
        if token == "all":
            picked = offered
        elif token == "last":
            picked = [offered[-1]]
        elif ":" in token:
            parts = token.split(":")
            if len(parts) > 3:
                raise InputError(
                    f"--steps {quoted}: range {shown(token, 40)} has more than start:stop:stride"
                )
            start = _int(parts[0], spec) if parts[0] else offered[0]
            stop = _int(parts[1], spec) if parts[1] else offered[-1]
            stride = _int(parts[2], spec) if len(parts) == 3 and parts[2] else 1
            if stride <= 0:
                raise InputError(f"--steps {quoted}: stride must be positive in {shown(token, 40)}")
            picked = [s for s in offered if start <= s <= stop and (s - start) % stride == 0]
            if not picked:
                raise InputError(
                    f"--steps {quoted}: range {shown(token, 40)} selects no offered step "
                    f"(offered: {offered[0]}..{offered[-1]}, {len(offered)} steps)"
                )
        elif token:
            step = _int(token, spec)
            if step not in offered:
                raise InputError(
                    f"--steps {quoted}: step {shown(step, 40)} is not offered; nearest: "
                    + ", ".join(map(str, nearest(step, offered)))
                )
            picked = [step]
        else:
            raise InputError(f"--steps {quoted}: empty item")
        chosen.extend(s for s in picked if s not in chosen)
    return chosen
