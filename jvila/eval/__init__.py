"""Evaluation: Arena ratings from pairwise battles (Elo, Bradley-Terry, bootstrap intervals), SORRY-Bench safety
refusal rates, and MT-bench with LLM judges. The command line is `jvila eval <benchmark> ...` (jvila/eval/cli.py).

This package imports only jvila and numeric libraries at module level; anything that needs the server is
imported lazily by the code path that uses it.
"""
