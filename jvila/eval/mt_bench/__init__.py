"""MT-bench (Zheng et al., 2023): multi-turn questions answered by the model under test and graded by an LLM judge,
following FastChat's llm_judge (github.com/lm-sys/FastChat, fastchat/llm_judge) in its prompts, sampling
temperatures, judging rules, file formats and result tables.

Modules: data (questions, judge prompts, reference answers), chat_client (OpenAI-compatible endpoints), answers
(answer generation), verdicts (reading ratings and verdicts from judge text), judging (single and pairwise
grading), judgment_files (their JSONL formats), results (the tables), cli (`jvila eval mt-bench`).
"""
