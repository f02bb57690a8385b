"""Data loading and splitting for honelm.

`honelm.data.readers` owns turning files (txt, jsonl, json, csv, tsv, parquet) into validated
`Example`/`Document` rows, raising a `DataError` (file, line, field) for every bad row.
`honelm.data.splits` owns deterministic, stratified, leak-checked train/val/test splits and the
lock that keeps the test split away from everything except `honelm test`.

Nothing is re-exported here so that importing `honelm.data` stays cheap (no pyarrow/numpy).
"""
