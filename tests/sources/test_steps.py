"""``--steps`` selection (SPEC section 2) on Pythia's 154 checkpoints."""

from __future__ import annotations

import pytest

from spinjax.errors import InputError, nearest
from spinjax.sources.known import PYTHIA_STEPS
from spinjax.sources.steps import select_steps

OFFERED = list(PYTHIA_STEPS)


def test_pythia_offers_154_steps():
    assert len(OFFERED) == 154
    assert OFFERED[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert OFFERED[-2:] == [142000, 143000]


def test_all_and_last():
    assert select_steps("all", OFFERED) == OFFERED
    assert select_steps("last", OFFERED) == [143000]


def test_offered_order_does_not_matter():
    assert select_steps("all", OFFERED[::-1]) == OFFERED
    assert select_steps("last", OFFERED[::-1]) == [143000]


def test_comma_list_keeps_given_order():
    assert select_steps("0,512,143000", OFFERED) == [0, 512, 143000]
    assert select_steps("143000,0,512", OFFERED) == [143000, 0, 512]
    assert select_steps(" 1000 , 2 ", OFFERED) == [1000, 2]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0:4000:1000", [0, 1000, 2000, 3000, 4000]),  # stop included when offered
        ("0:4500:1000", [0, 1000, 2000, 3000, 4000]),  # stop not offered: up to it
        ("1000:10000:3000", [1000, 4000, 7000, 10000]),
        ("2000:9000:3000", [2000, 5000, 8000]),
        (":8", [0, 1, 2, 4, 8]),  # open start, default stride 1
        ("0:8:2", [0, 2, 4, 8]),  # stride counts from start, not from offered indices
        ("1:16:", [1, 2, 4, 8, 16]),  # empty stride is 1
        ("141000:", [141000, 142000, 143000]),  # open stop
    ],
)
def test_ranges(spec, expected):
    assert select_steps(spec, OFFERED) == expected


def test_full_open_range_is_all():
    assert select_steps(":", OFFERED) == OFFERED
    assert select_steps("::1000", OFFERED) == [0, *range(1000, 143001, 1000)]


def test_mix_keeps_first_mention_order_without_repeats():
    got = select_steps("1000,0:2000:1000,last,1000,2,0:4", OFFERED)
    assert got == [1000, 0, 2000, 143000, 2, 1, 4]
    assert len(got) == len(set(got))
    assert select_steps("last,all", OFFERED) == [143000, *OFFERED[:-1]]
    assert select_steps("all,all,last", OFFERED) == OFFERED


def test_local_checkpoint_offers_only_minus_one():
    assert select_steps("last", [-1]) == [-1]
    assert select_steps("all", [-1]) == [-1]
    assert select_steps("-1", [-1]) == [-1]


def test_nearest():
    assert nearest(999, OFFERED) == [256, 512, 1000]
    assert nearest(3, OFFERED, k=2) == [2, 4]
    assert nearest(10**6, OFFERED, k=1) == [143000]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("999", ["999", "1000", "512"]),
        ("0,1500", ["1500", "1000", "2000"]),
        ("200000", ["200000", "143000"]),
        ("3", ["3", "2", "4"]),
        ("-5", ["-5", "0"]),
    ],
)
def test_step_not_offered_names_nearest(spec, named):
    with pytest.raises(InputError, match="not offered") as info:
        select_steps(spec, OFFERED)
    message = str(info.value)
    assert "nearest" in message
    for text in named:
        assert text in message


@pytest.mark.parametrize("spec", ["abc", "10a", "1.5", "0:x", "a:100", "0:100:z", "last5"])
def test_garbage_token(spec):
    with pytest.raises(InputError, match="not a step number"):
        select_steps(spec, OFFERED)


@pytest.mark.parametrize("spec", ["0:1000:0", "0:1000:-1000", ":8:-1"])
def test_zero_or_negative_stride(spec):
    with pytest.raises(InputError, match="stride"):
        select_steps(spec, OFFERED)


@pytest.mark.parametrize(
    "spec", ["3:3", "513:999", "4000:0", "200000:300000", "1001:5000:1000", "140500::1000"]
)
def test_range_selecting_nothing(spec):
    with pytest.raises(InputError, match="selects no offered step") as info:
        select_steps(spec, OFFERED)
    assert spec in str(info.value)


def test_range_with_too_many_parts():
    with pytest.raises(InputError, match="start:stop:stride"):
        select_steps("0:10:2:3", OFFERED)


@pytest.mark.parametrize("spec", ["", "0,,1000", "0,", ",0", " , "])
def test_empty_item(spec):
    with pytest.raises(InputError, match="empty item"):
        select_steps(spec, OFFERED)


def test_error_anywhere_in_a_mix_rejects_the_whole_spec():
    with pytest.raises(InputError, match="999"):
        select_steps("0,1000,999,last", OFFERED)


def test_no_offered_steps():
    with pytest.raises(InputError):
        select_steps("all", [])


@pytest.mark.parametrize(
    "spec",
    [
        ",".join(str(s) for s in range(10_000)) + ",x",  # the whole list echoed: 49,000 characters
        "1" * 4000,  # a step number of 4000 digits
        "0:" + "9" * 5000,  # not a number (more digits than int() takes)
        "last," * 2000 + ",",
    ],
)
def test_messages_quote_a_long_spec_cut(spec):
    with pytest.raises(InputError) as info:
        select_steps(spec, [0, 1, 2])
    message = str(info.value)
    assert message.startswith("--steps '") and len(message) < 300, len(message)
