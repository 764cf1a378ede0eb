"""Shared by the tests/test_import*.py files: where the import fixtures live, and the malformed
long-table files with the one-line message each must produce (read by the importer and the CLI)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data" / "import"
CONFIGS = DATA / "configs"

BAD_CASES = [
    ("wrong_count.csv", r"bad/wrong_count\.csv:4: 3 expert ids where rows have 2"),
    (
        "non_integer.csv",
        r"bad/non_integer\.csv:3: expert id 'x' in column 'experts' is not an integer",
    ),
    ("missing_column.csv", r"bad/missing_column\.csv: no experts column found"),
    ("ragged.csv", r"bad/ragged\.csv:3: row has 3 fields, the header has 4"),
    ("bad_json.jsonl", r"bad/bad_json\.jsonl:2: not valid JSON"),
    (
        "float_id.jsonl",
        r"bad/float_id\.jsonl:3: expert id 1\.5 in column 'experts' is not an integer",
    ),
    ("missing_key.jsonl", r"bad/missing_key\.jsonl:2: no expert ids"),
    ("duplicate.csv", r"bad/duplicate\.csv:3: expert id 3 appears twice in one row"),
    # Numbers beyond 64 bits: Arrow refuses the text (CSV) or reads a float (JSONL), or the slow
    # JSONL path (a column whose type changes) gets a Python int beyond any Arrow type.
    (
        "huge_int.csv",
        r"bad/huge_int\.csv:3: expert id 99999999999999999999999 in column 'experts' "
        r"does not fit in a 64-bit integer",
    ),
    (
        "huge_int.jsonl",
        r"bad/huge_int\.jsonl:2: layer 1e\+23 in column 'layer' does not fit in a 64-bit integer",
    ),
    (
        "huge_position.jsonl",
        r"bad/huge_position\.jsonl:3: position 18446744073709551615 in column 'position' "
        r"does not fit in a 64-bit integer",
    ),
    # Fits in 64 bits but not in the trace's 32-bit token ids.
    (
        "big_token_id.csv",
        r"bad/big_token_id\.csv:4: token id 9999999999 is out of range "
        r"\(-2147483648\.\.2147483647\)",
    ),
]
