"""Content safety: filters that score text for harm, their measured evaluation, and the
screening of the federated model's answers every round.

- `base`: the `SafetyFilter` protocol and the `FilterScores` every filter returns.
- `filters`: the registry (`create_filter("lexicon" | "embedding[:DIR]" | "hf:ID" |
  "guard:ID" | "judge:MODEL")`) over `lexicon`, `embedding` (MiniLM + a logistic head fedllm
  trains), `hf_classifier` (sequence classifiers and Llama-Guard-style guard LLMs) and `judge`.
- `labelled`: labelled sets (`text,label[,category]`, CSV or JSONL); `bundled`: the sets
  built from package data (`data/PROVENANCE.md`).
- `metrics`: pure metric maths with bootstrap confidence intervals; `evaluation`: a filter
  on a set, as JSON, HTML and a table.
- `refusal`, `screen`: the global model's answers to probe prompts, scored, and the gate.
"""
