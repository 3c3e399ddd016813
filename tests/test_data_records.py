"""llm_jax.data.records: a record's fields are checked by its kind."""

import numpy as np

from llm_jax.data.records import check_record


def test_check_record_label_rules():
    assert check_record({"text": "a", "label": np.int64(2)}, "classification") == {"text": "a", "label": 2}
    assert "not an integer" in check_record({"text": "a", "label": "1"}, "classification")
    assert "not an integer" in check_record({"text": "a", "label": True}, "classification")
    assert "not an integer" in check_record({"text": "a", "label": 1.0}, "classification")
    assert ">= 0" in check_record({"text": "a", "label": -1}, "classification")
    assert check_record({"text": "a"}, "classification") == "missing field 'label'"
