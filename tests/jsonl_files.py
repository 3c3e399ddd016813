"""Writing JSONL data files for the tests that train on local files
(test_experiment_llama_sft_dpo.py, test_lora.py, test_hf.py)."""

import json


def write_jsonl(path, records, bad_line=False):
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if bad_line and i == 3:
                f.write("{not json\n")
