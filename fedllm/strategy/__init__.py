"""The coordinator's round, as small stages around a Flower strategy.

Kept free of imports on purpose: `fedllm.config` reads the strategy names from
`fedllm.strategy.flower`, and importing the stages here would make that a cycle. The
stages and their order are in `fedllm.strategy.pipeline`; the loop in
`fedllm.strategy.loop`.
"""
