"""Verifiers for the GRPO tests, importable as `tests.grpo_verifiers:NAME`."""

NOT_A_FUNCTION = 3


def starts_with_answer(prompt: str, completion: str, record: dict) -> float:
    """1.0 if the completion starts with the record's answer (a string)."""
    del prompt
    return float(completion.startswith(str(record["answer"])))


def answer_share(prompt: str, completion: str, record: dict) -> float:
    """The share of the completion's characters that occur in the record's answer:
    a dense reward, so a tiny random policy gets a signal from its first samples."""
    del prompt
    return sum(c in str(record["answer"]) for c in completion) / max(len(completion), 1)


def needs_field(prompt: str, completion: str, record: dict) -> float:
    """Reads a field that only some records have: fails on the others."""
    return float(record["extra"] == completion)


def returns_text(prompt: str, completion: str, record: dict):
    return "yes"


def returns_nan(prompt: str, completion: str, record: dict) -> float:
    return float("nan")


def starts_lowercase(prompt: str, completion: str, record: dict) -> float:
    """1.0 if the completion's first character is a lowercase ASCII letter (a toy
    verifiable task: about 26 of a byte model's 262 tokens, so a random policy
    already succeeds now and then)."""
    return float(completion[:1].isascii() and completion[:1].islower())


def flat_or_parity(prompt: str, completion: str, record: dict) -> float:
    """Records with "flat": 1.0 whatever the completion (a group of equal rewards);
    the others: the parity of the completion's length (rewards that differ)."""
    return 1.0 if record.get("flat") else float(len(completion) % 2)


def fails_on_text(prompt: str, completion: str, record: dict) -> float:
    """Fine on the empty completion (the stage's check before training), fails on a sampled one."""
    if completion:
        raise ValueError("cannot score this")
    return 0.0


def checksum_digit(prompt: str, completion: str, record: dict) -> float:
    """The last digit of the completion's code-point sum, / 10: rewards that differ
    from sample to sample (for tests of the wiring, not of learning)."""
    return (sum(map(ord, completion)) % 10) / 10
