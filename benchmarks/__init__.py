"""fedllm's benchmarks: one script per measurement, each writing one JSON result.

A regular package, not a namespace one: opacus 1.6 installs a top-level `benchmarks`
package of its own, which would otherwise shadow this directory on import.
"""
