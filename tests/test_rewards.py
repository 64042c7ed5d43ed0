"""Tests of pr1_jax.rewards: hand-written responses with hand-computed expected rewards."""

import math
import os
import threading
import time

import pytest

from pr1_jax.rewards import (
    BatchScores,
    combine_batch,
    RewardConfig,
    RewardScorer,
    accuracy_reward,
    extract_answer,
    format_reward,
    gold_text,
    get_reward,
    mean_metrics,
    ngram_penalty,
    overlong_penalty,
    register_reward,
    score,
)

GOOD = "<think>\nThe legs are 3 and 4.\n</think>\n<answer>\nThe answer is \\boxed{12}.\n</answer>"
HOSTILE = "<think>\nbig\n</think>\n<answer>\n\\boxed{9^{9^{9^{9}}}}\n</answer>"


# Custom rewards live at module level so worker processes can unpickle them by reference.
@register_reward("test_keyword")
def keyword_reward(response, ground_truth, *, keyword=""):
    return 1.0 if keyword and keyword in response else 0.0


@register_reward("test_flaky")
def flaky_reward(response, ground_truth, *, mode="ok"):
    if mode == "raise":
        raise ValueError("boom")
    if mode == "exit":
        os._exit(3)
    return math.nan if mode == "nan" else 1.0


# --- accuracy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, gold",
    [
        (GOOD, "12"),
        ("So the area is \\boxed{12}.", "12"),  # no tags: whole text
        ("<answer>\n\\boxed{0.5}\n</answer>", "\\frac{1}{2}"),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "0.5"),
        ("<answer>\\boxed{\\sqrt{12}}</answer>", "2\\sqrt{3}"),  # needs the gold wrapped in $..$
        ("<answer>\\boxed{2\\sqrt{3}}</answer>", "2\\sqrt{3}"),
        ("<answer>\\boxed{0.75}</answer>", "\\frac{3}{4}"),
        ("<answer>\\boxed{45^\\circ}</answer>", "45"),
        ("<answer>\\boxed{12}, that is \\boxed{12}</answer>", "12"),  # repeated, same value
        ("<answer>The answer is 12</answer>", "12"),  # unboxed number still parses
        # A wrong \boxed in the think block is ignored: only the (multi-line) answer counts.
        ("<think>\nFirst guess \\boxed{13}.\n</think>\n<answer>\n\\boxed{12}\n</answer>", "12"),
    ],
)
def test_accuracy_correct(response, gold):
    assert accuracy_reward(response, gold) == 1.0


@pytest.mark.parametrize(
    "response, gold",
    [
        ("<answer>\\boxed{13}</answer>", "12"),
        ("<answer>\\boxed{12} or \\boxed{13}</answer>", "12"),  # hedging between two values
        ("<answer></answer>", "12"),
        ("<answer>\n\n</answer>", "12"),
        ("", "12"),
        ("<answer>\\boxed{12.0001}</answer>", "12"),
        ("<answer>\\boxed{2}</answer>", "2\\sqrt{3}"),  # bare gold must not parse as 2
        ("<think>\n\\boxed{12}\n</think>\n<answer>\n\\boxed{13}\n</answer>", "12"),
    ],
)
def test_accuracy_wrong(response, gold):
    assert accuracy_reward(response, gold) == 0.0


def test_extract_answer():
    assert extract_answer("a <answer> 7 </answer> b <answer>8</answer>") == "7"
    assert extract_answer("<answer>\nx\ny\n</answer>") == "x\ny"
    assert extract_answer("  no tags \n") == "no tags"
    assert extract_answer("<answer><answer>12</answer></answer>") == "<answer>12"
    assert extract_answer("<answer>unclosed") == "<answer>unclosed"
    # The reference's regex has no DOTALL: a block spanning lines is no block, the whole text is.
    assert extract_answer("<answer>\nx\n</answer>", "reference") == "<answer>\nx\n</answer>"
    assert extract_answer("<think>\nx\n</think> <answer> 7 </answer>", "reference") == "7"
    with pytest.raises(ValueError, match="accuracy mode"):
        extract_answer("x", "Reference")


def test_gold_text():
    assert gold_text(" 2\\sqrt{3} ") == "$2\\sqrt{3}$"
    assert gold_text("$12$") == "$12$" and gold_text("\\boxed{12}") == "\\boxed{12}"
    assert gold_text(" 2\\sqrt{3} ", "reference") == "2\\sqrt{3}"


# Where the two accuracy modes differ: (response, gold, paper, reference), verified with
# math-verify 0.9. In the reference a multi-line answer block is never read, so math-verify
# parses the whole response: mostly its last \boxed{}, but two different boxed values with a
# comma anywhere between them parse as a set, which matches no gold; bare gold reads `2\sqrt{3}`
# as 2, `5 \sqrt { 3 }` (Geometry3K's own spacing) as 3, and `\sqrt{3}` as nothing.
MODE_CASES = [
    # boxed in think, unboxed answer block: the reference credits the think block
    ("<think>\nI get \\boxed{12}.\n</think>\n<answer>\nThe answer is 13\n</answer>", "12", 0.0, 1.0),
    # a boxed guess in think, a comma, the right answer boxed last: the reference parses {12, 13}
    ("<think>\nFirst \\boxed{12}, then I check.\n</think>\n<answer>\n\\boxed{13}\n</answer>", "13", 1.0, 0.0),
    ("<think>\nFirst \\boxed{12}, then I check.\n</think>\n<answer>\n\\boxed{13}\n</answer>", "12", 0.0, 0.0),
    # text after the answer block: the reference reads its last \boxed{}
    ("<think>\nx\n</think>\n<answer>\n\\boxed{12}\n</answer>\nOr maybe \\boxed{13}", "12", 1.0, 0.0),
    # the right answer in the rewarded format, gold with a root: the reference scores it 0 ...
    ("<think>\nx\n</think>\n<answer>\n\\boxed{4\\sqrt{2}}\n</answer>", "4\\sqrt{2}", 1.0, 0.0),
    ("<answer>\\boxed{5\\sqrt{3}}</answer>", "5 \\sqrt { 3 }", 1.0, 0.0),
    ("<answer>\\boxed{\\sqrt{3}}</answer>", "\\sqrt{3}", 1.0, 0.0),
    # ... and the coefficient alone 1
    ("<answer>\\boxed{2}</answer>", "2\\sqrt{3}", 0.0, 1.0),
    # agreeing: one-line block, a wrong guess in think with the right multi-line answer last,
    # a gold without a root
    ("<answer>\\boxed{0.5}</answer>", "\\frac{1}{2}", 1.0, 1.0),
    ("<think>\nFirst guess \\boxed{13}.\n</think>\n<answer>\n\\boxed{12}\n</answer>", "12", 1.0, 1.0),
    ("<think>\nx\n</think>\n<answer>\n\\boxed{13}\n</answer>", "12", 0.0, 0.0),
]


@pytest.mark.parametrize("response, gold, paper, reference", MODE_CASES)
def test_accuracy_modes(response, gold, paper, reference):
    assert accuracy_reward(response, gold) == paper  # paper is the default
    assert accuracy_reward(response, gold, mode="paper") == paper
    assert accuracy_reward(response, gold, mode="reference") == reference
    assert score(response, gold, accuracy_mode="reference")["accuracy"] == reference
    assert score(response, gold, config=RewardConfig(accuracy_mode="reference"))["accuracy"] == reference
    assert score(response, gold, config=RewardConfig(accuracy_mode="reference"),
                 accuracy_mode="paper")["accuracy"] == paper


# --- format ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        GOOD,
        "<think>\n\n</think>\n<answer>\n\\boxed{1}\n</answer>",  # empty think
        "<think>\nline 1\nline 2\n</think>\n<answer>\nso\n$x=\\boxed{\\frac{1}{2}}$ done\n</answer>",
        # The reference's lazy DOTALL groups span tags: nested / repeated tags still match.
        "<think>\n<think>\nx\n</think>\n</think>\n<answer>\n\\boxed{1}\n</answer>",
        "<think>\na\n</think>\n<answer>\n\\boxed{1}\n</answer>\n<answer>\n\\boxed{2}\n</answer>",
    ],
)
def test_format_ok(response):
    assert format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<think>reasoning\n</think>\n<answer>\n\\boxed{1}\n</answer>",  # no newline after <think>
        "<think>\nreasoning</think>\n<answer>\n\\boxed{1}\n</answer>",  # none before </think>
        "<think>\nreasoning\n</think><answer>\n\\boxed{1}\n</answer>",  # none between blocks
        "<think>\nreasoning\n</think>\n<answer>\n\\boxed{1}</answer>",  # none before </answer>
        GOOD + "\n",  # trailing newline: fullmatch on the raw text, as in the reference
        GOOD + " Hope this helps!",
        " " + GOOD,
        "<think>\nreasoning\n</think>\n<answer>\n12\n</answer>",  # no \boxed
        "<think>\nreasoning\n</think>\n<answer>\n\\boxed{}\n</answer>",  # empty \boxed
        "<think>\n\\boxed{1}\n</think>\n<answer>\n1\n</answer>",  # \boxed only in think
        "<answer>\n\\boxed{1}\n</answer>",  # no think block
        "<answer>\n\\boxed{1}\n</answer>\n<think>\nx\n</think>",  # blocks swapped
        "",
    ],
)
def test_format_bad(response):
    assert format_reward(response) == 0.0


# --- n-gram penalty --------------------------------------------------------------------


def test_ngram_short_responses_are_not_penalised():
    assert ngram_penalty("a " * 19) == 0.0
    assert ngram_penalty("a " * 20) == 0.0  # one 20-gram: 1 unique of 1
    assert ngram_penalty("") == 0.0


def test_ngram_exact_repetition():
    assert ngram_penalty("a " * 21) == pytest.approx(-1.0)  # 2 grams, 1 unique: (1 - 1/2) * -2
    # 5-word period, 40 words: 21 grams, 5 unique.
    assert ngram_penalty("one two three four five " * 8) == pytest.approx((1 - 5 / 21) * -2)
    assert ngram_penalty(" ".join(f"w{i}" for i in range(30))) == 0.0


def test_ngram_is_case_insensitive_and_splits_on_any_whitespace():
    words = [f"word{i}" for i in range(20)]
    # Lower-cased, the second half repeats the first: 21 grams, 20 unique.
    text = " ".join(words) + "\n" + "\t".join(w.upper() for w in words)
    assert ngram_penalty(text) == pytest.approx((1 - 20 / 21) * -2)
    assert ngram_penalty("One TWO three four five " * 8) == ngram_penalty("one two three four five " * 8)


def test_ngram_options_come_from_config():
    config = RewardConfig(
        weights={"ngram_penalty": 1.0}, options={"ngram_penalty": {"n": 2, "max_penalty": -1.0}}
    )
    # Bigrams of "a a a a": 3, 1 unique.
    assert score("a A a a", "", config=config)["ngram_penalty"] == pytest.approx(-2 / 3)


@pytest.mark.parametrize("length, want", [(0, 0.0), (768, 0.0), (769, -1 / 256), (896, -0.5), (1024, -1.0),
                                          (1100, -1.0)])
def test_overlong_penalty_by_hand(length, want):
    # DAPO eq. 13 with L_max = 1024 (the cap), L_cache = 256: 0 up to 768 tokens, linear to -1 at the cap
    assert overlong_penalty("", response_length=length, max_length=1024, buffer=256) == pytest.approx(want)


def test_overlong_is_off_by_default_and_weighted_with_the_trainer_fields():
    assert "overlong" not in RewardConfig().weights
    assert RewardConfig().declared_fields({"response_length": 900, "max_length": 1024}) == {}
    config = RewardConfig(weights={"accuracy": 1.0, "overlong": 0.5}, options={"overlong": {"buffer": 256}})
    fields = config.declared_fields({"response_length": 896, "max_length": 1024, "other": 1})
    assert fields == {"response_length": 896, "max_length": 1024}
    s = score(GOOD, "12", config=config, fields=fields)
    assert (s["overlong"], s["overall"]) == (-0.5, pytest.approx(1.0 - 0.25))
    with pytest.raises(ValueError, match="buffer"):
        score(GOOD, "12", config=config, fields=dict(fields, max_length=100))


# --- score / combine ---------------------------------------------------------------------


def test_score_default_weights():
    s = score(GOOD, "12", visual=0.5)
    assert s == {
        "accuracy": 1.0,
        "format": 1.0,
        "ngram_penalty": 0.0,
        "visual": 0.5,
        "has_visual": True,
        "overall": pytest.approx(0.9 + 0.1 + 0.7 * 0.5),
        "overall_reference": pytest.approx(0.9 + 0.1 + 0.7 * 0.5),
    }
    s = score(GOOD, "13")
    assert (s["visual"], s["has_visual"], s["overall"]) == (0.0, False, pytest.approx(0.1))


def test_score_adds_ngram_penalty():
    response = "<think>\n" + "a b c d e " * 8 + "\n</think>\n<answer>\n\\boxed{12}\n</answer>"
    # 45 words, 26 grams; unique: 1 with <think>, 5 inside the loop, 4 reaching the tail.
    penalty = (1 - 10 / 26) * -2
    s = score(response, "12", visual=1.0)
    assert s["ngram_penalty"] == pytest.approx(penalty)
    assert s["overall"] == pytest.approx(0.9 + 0.1 + 0.7 + penalty)
    assert s["overall_reference"] == pytest.approx(0.9 + 0.1 + 0.7)  # the reference logs it without


def test_score_custom_weights_and_reward():
    config = RewardConfig(weights={"accuracy": 2.0, "test_keyword": 0.5, "visual": 1.0})
    s = score(GOOD, "12", visual=0.25, config=config, fields={"keyword": "legs"})
    assert set(s) == {"accuracy", "test_keyword", "visual", "has_visual", "overall", "overall_reference"}
    assert s["overall"] == pytest.approx(2.0 + 0.5 + 0.25)
    assert score(GOOD, "12", config=config, fields={"keyword": "hypotenuse"})["test_keyword"] == 0.0


def test_score_rejects_non_finite_rewards():
    config = RewardConfig(weights={"test_flaky": 1.0})
    assert score("x", "y", config=config)["overall"] == 1.0
    with pytest.raises(ValueError, match="nan"):
        score("x", "y", config=config, fields={"mode": "nan"})


def test_misspelt_keywords_options_and_fields_fail():
    with pytest.raises(TypeError, match="accuracy_mod"):
        score(GOOD, "12", accuracy_mod="reference")
    with pytest.raises(TypeError, match="keyword"):
        score(GOOD, "12", keyword="legs")  # record fields go in fields=
    with pytest.raises(ValueError, match="accuracy_mode"):
        score(GOOD, "12", accuracy_mode="refrence")
    with pytest.raises(ValueError, match="accuracy_mode"):
        RewardConfig(accuracy_mode="Paper")
    config = RewardConfig(weights={"accuracy": 1.0, "test_keyword": 1.0})
    with pytest.raises(ValueError, match="keywrd"):
        score(GOOD, "12", config=config, fields={"keywrd": "legs"})
    with pytest.raises(ValueError, match="keyword"):  # taken by no configured reward
        score(GOOD, "12", fields={"keyword": "legs"})
    with pytest.raises(ValueError, match=r"options.ngram_penalty: unknown option\(s\) \['size'\]"):
        RewardConfig(options={"ngram_penalty": {"size": 3}})
    with pytest.raises(ValueError, match="accuracy_mode"):
        RewardConfig(options={"accuracy": {"mode": "reference"}})
    with pytest.raises(ValueError, match="unknown reward 'ngram'"):
        RewardConfig(options={"ngram": {"n": 3}})
    with pytest.raises(ValueError, match="also options"):
        score("x", "y", config=RewardConfig(weights={"test_flaky": 1.0}, options={"test_flaky": {"mode": "ok"}}),
              fields={"mode": "nan"})
    # options of a reward without a weight are allowed (the default n-gram options stay valid)
    assert RewardConfig(weights={"accuracy": 1.0}).reward_kwargs() == {"accuracy": {"mode": "paper"}}


def test_mean_metrics_leaves_unannotated_samples_out_of_visual():
    scores = [score(GOOD, "12", visual=0.5), score(GOOD, "12"), score(GOOD, "13", visual=1.0)]
    means = mean_metrics(scores)
    assert means["visual"] == pytest.approx(0.75)
    assert means["accuracy"] == pytest.approx(2 / 3)
    assert means["overall"] == pytest.approx((1.35 + 1.0 + 0.8) / 3)
    assert "visual" not in mean_metrics([score(GOOD, "12")])


def test_mean_metrics_adds_the_reference_names():
    looping = "<think>\n" + "a b c d e " * 8 + "\n</think>\n<answer>\n\\boxed{12}\n</answer>"
    scores = [score(looping, "12", visual=0.5), score(GOOD, "13")]
    ours = mean_metrics(scores)
    penalty = scores[0]["ngram_penalty"] / 2
    assert ours["overall"] == pytest.approx(ours["overall_reference"] + penalty)
    train = mean_metrics(scores, split="train")
    assert train == {**ours, "reward/overall": ours["overall_reference"], "reward/accuracy": 0.5,
                     "reward/format": 1.0, "reward/ngram_penalty": penalty, "reward/visual": 0.5,
                     "critic/score/mean": ours["overall"]}
    val = mean_metrics(scores, split="val")
    assert val == {**ours, "overall_reward": ours["overall_reference"], "accuracy_reward": 0.5,
                   "format_reward": 1.0, "ngram_penalty_reward": penalty, "visual_reward": 0.5,
                   "reward_score": ours["overall"]}
    with pytest.raises(ValueError, match="split"):
        mean_metrics(scores, split="test")


# --- registry --------------------------------------------------------------------------


def test_registry():
    assert get_reward("accuracy") is accuracy_reward
    assert get_reward("test_keyword") is keyword_reward
    assert register_reward("test_keyword")(keyword_reward) is keyword_reward  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(keyword_reward)
    with pytest.raises(ValueError, match="reserved"):
        register_reward("visual")(keyword_reward)
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("no_such_reward")
    with pytest.raises(ValueError, match="unknown reward"):  # a config error at start-up
        RewardConfig(weights={"no_such_reward": 1.0})


def test_config_validation():
    with pytest.raises(ValueError):
        RewardConfig(timeout_s=0)
    with pytest.raises(ValueError):
        RewardConfig(num_workers=0)


# --- RewardScorer ----------------------------------------------------------------------

RECORDS = [
    {"response": GOOD, "ground_truth": "12"},
    {"response": GOOD, "ground_truth": "13"},
    {"response": "\\boxed{\\sqrt{12}}", "ground_truth": "2\\sqrt{3}"},
    {"response": "one two three four five " * 8, "ground_truth": "1"},
]
VISUAL = [0.5, None, 0.0, None]  # the judge's score per record (None: no annotations)
JUDGED = {"visual": [v or 0.0 for v in VISUAL], "has_visual": [v is not None for v in VISUAL]}


def expected(records, config=RewardConfig(), visual=(None,) * len(RECORDS)):
    return [
        score(r["response"], r["ground_truth"], visual=v, config=config)
        for r, v in zip(records, visual)
    ]


def terms(scores, config=RewardConfig()):
    return [{k: s[k] for k in config.reward_names} for s in scores]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=2)) as s:
        yield s


def test_scorer_matches_in_process_score(scorer):
    result = scorer.submit(RECORDS).result(timeout=60)
    assert isinstance(result, BatchScores)
    assert (result.timeouts, result.errors) == (0, 0)
    assert result.terms == terms(expected(RECORDS))
    scores = combine_batch(result.terms, JUDGED, RewardConfig().weights)
    assert scores == expected(RECORDS, visual=VISUAL)
    assert [s["overall"] for s in scores] == pytest.approx(
        [1.35, 0.1, 0.9, (1 - 5 / 21) * -2]
    )
    assert combine_batch(result.terms, None, RewardConfig().weights) == expected(RECORDS)
    with pytest.raises(ValueError, match="judge verdicts"):
        combine_batch(result.terms[:2], JUDGED, RewardConfig().weights)
    assert scorer.submit([]).result(timeout=60) == BatchScores([], 0, 0)


def test_scorer_passes_the_accuracy_mode_to_workers():
    records = [{"response": r, "ground_truth": g} for r, g, _, _ in MODE_CASES]
    with RewardScorer(RewardConfig(accuracy_mode="reference", num_workers=1)) as s:
        result = s.submit(records).result(timeout=60)
    assert (result.timeouts, result.errors) == (0, 0)
    assert [t["accuracy"] for t in result.terms] == [c[3] for c in MODE_CASES]


def test_scorer_queues_batches_in_order(scorer):
    futures = [scorer.submit(RECORDS[i : i + 1]) for i in range(len(RECORDS))]
    assert [f.result(timeout=60).terms[0] for f in futures] == terms(expected(RECORDS))


def test_scorer_passes_record_fields_to_custom_rewards():
    config = RewardConfig(weights={"test_keyword": 1.0}, num_workers=1)
    records = [
        {"response": GOOD, "ground_truth": "12", "keyword": "legs"},
        {"response": GOOD, "ground_truth": "12", "keyword": "cosine"},
    ]
    with RewardScorer(config) as s:
        result = s.submit(records).result(timeout=60).terms
    assert [x["test_keyword"] for x in result] == [1.0, 0.0]


def test_scorer_and_score_work_off_the_main_thread():
    # math-verify's own timeouts use signal.alarm, which raises off the main thread.
    outcome = {}

    def body():
        outcome["score"] = score(GOOD, "12")
        with RewardScorer(RewardConfig(num_workers=1)) as s:
            outcome["batch"] = s.submit(RECORDS).result(timeout=60)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive()
    assert outcome["score"]["overall"] == pytest.approx(1.0)
    assert outcome["batch"].terms == terms(expected(RECORDS))


def test_hung_verification_is_bounded_and_the_worker_replaced():
    # One worker: the sample after the hostile one can only be scored by its replacement.
    config = RewardConfig(timeout_s=1.0, num_workers=1)
    records = [
        {"response": HOSTILE, "ground_truth": "12"},
        {"response": GOOD, "ground_truth": "12"},
    ]
    s = RewardScorer(config)
    start = time.monotonic()
    result = s.submit(records).result(timeout=60)  # a hang fails here (close() would wait)
    elapsed = time.monotonic() - start
    again = s.submit(records[1:]).result(timeout=60)
    s.close()
    assert (result.timeouts, result.errors) == (1, 0)
    hostile, good = combine_batch(result.terms, {"visual": [1.0, 0.0], "has_visual": [True, False]},
                                  config.weights)
    assert hostile["accuracy"] == 0.0
    assert hostile["format"] == 1.0  # the other terms of the sample are still scored
    assert hostile["overall"] == pytest.approx(0.1 + 0.7)
    assert good["overall"] == pytest.approx(1.0)
    assert 1.0 <= elapsed < 30.0
    assert (again.timeouts, again.terms[0]["accuracy"]) == (0, 1.0)


def test_scorer_counts_errors_and_survives_crashes():
    config = RewardConfig(weights={"test_flaky": 1.0}, num_workers=1)
    modes = ["ok", "raise", "exit", "nan", "ok"]
    records = [{"response": "x", "ground_truth": "y", "mode": m} for m in modes]
    with RewardScorer(config) as s:
        result = s.submit(records).result(timeout=60)
    assert (result.timeouts, result.errors) == (0, 3)
    assert [x["test_flaky"] for x in result.terms] == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_scorer_rejects_bad_input_in_the_caller(scorer):
    with pytest.raises(KeyError):
        scorer.submit([{"response": GOOD}])
    with pytest.raises(ValueError, match="record 1: .*'answer'"):
        scorer.submit([RECORDS[0], {**RECORDS[0], "answer": "12"}])
    register_reward("test_lambda")(lambda response, ground_truth, **_: 1.0)
    with pytest.raises(ValueError, match="module-level"):
        RewardScorer(RewardConfig(weights={"test_lambda": 1.0}))


def test_scorer_close():
    s = RewardScorer(RewardConfig(num_workers=1))
    future = s.submit(RECORDS[:1])
    s.close()  # waits for submitted batches
    assert future.result(timeout=0).terms == terms(expected(RECORDS[:1]))
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.submit(RECORDS)
    assert not any(w.proc.is_alive() for w in s._workers)


def test_nested_braces_in_boxed():
    r = "<think>\nx\n</think>\n<answer>\n\\boxed{\\frac{\\sqrt{3}}{2}}\n</answer>"
    assert accuracy_reward(r, "\\frac{\\sqrt{3}}{2}") == 1.0
    assert accuracy_reward(r, "\\frac{\\sqrt{2}}{2}") == 0.0
    assert format_reward(r) == 1.0


def test_crlf_newlines():
    """The paper's format regex wants \\n; a CRLF response fails the format (as the reference
    does) while its answer is still verified."""
    r = "<think>\r\nAB = 5\r\n</think>\r\n<answer>\r\n\\boxed{5}\r\n</answer>"
    assert format_reward(r) == 0.0
    assert accuracy_reward(r, "5") == 1.0
